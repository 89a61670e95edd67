"""`unimoe bench codec [--codec NAME] [--seconds S] [--threads N] [--device D] [--json] [--quick]`: what one
codec costs: its size, the time to build it, and encode / decode real-time factors (seconds of compute per
second of audio; < 1 is faster than real time) on one clip of S seconds (a tone with noise at the codec's
rate). Each is timed `repeats` times after a warm-up and the best is kept (the machine may be shared).
The random codecs (`random`, `dac_16khz_random`) have the cost of their trained twins. Last line: JSON.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from data_prep.codec import load_codec


def _clip(seconds: float, sample_rate: int) -> torch.Tensor:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(len(t))
    return torch.from_numpy(x.astype(np.float32)).view(1, 1, -1)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(codec_name: str = "dac_16khz_random", seconds: float = 5.0, threads: int | None = None,
        device: str = "cpu", repeats: int = 3) -> dict:
    old_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        codec = load_codec(codec_name, bandwidth=None, device=device)
        build_s = time.perf_counter() - t0
        wav = _clip(seconds, codec.sample_rate).to(codec.device)
        codes = codec.encode(wav)  # warm-up
        codec.decode(codes)
        encode_s = _best(lambda: codec.encode(wav), repeats)
        decode_s = _best(lambda: codec.decode(codes), repeats)
        model = getattr(codec, "model", None)
        return {
            "benchmark": "codec",
            "codec": codec_name,
            "trained": codec.trained,
            "device": str(codec.device),
            "torch_threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()) if model is not None else None,
            "sample_rate": codec.sample_rate,
            "frame_rate": codec.frame_rate,
            "num_codebooks": codec.num_codebooks,
            "audio_seconds": seconds,
            "build_s": round(build_s, 3),
            "encode_s": round(encode_s, 3),
            "decode_s": round(decode_s, 3),
            "encode_rtf": round(encode_s / seconds, 4),
            "decode_rtf": round(decode_s / seconds, 4),
            "repeats": repeats,
        }
    finally:
        torch.set_num_threads(old_threads)


def run_cli(args) -> int:
    result = run(args.codec, seconds=min(args.seconds, 1.0) if args.quick else args.seconds,
                 threads=args.threads, device=args.device, repeats=1 if args.quick else 3)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    print(json.dumps(result))
    return 0
