"""`unimoe bench prep [--json] [--quick] [--workers N] [--seconds S] [--mixed-seconds M]`: what prep costs
over the codec.

Two sets of generated audio at 22.05 kHz (so decoding and resampling are real work): `uniform`, clips of
3 s (`--seconds` of audio), and `mixed`, clips of 1-60 s (`--mixed-seconds` of audio, lengths drawn
uniformly, then scaled to that total). On each:
  codec_only:  the audio already decoded, resampled and in memory; only the codec encode is timed, with
               prep's own batching (sort windows of `sort_window` lines, batches of `batch_seconds`).
  pipeline:    the whole `unimoe data prep` (manifest, decode + checks + resample in `--workers` processes,
               codec encode, text ids, shard writing with checksums), the codec object already loaded
               and megatron-core imported (one-time costs); the decode workers' start-up is timed.
Both run with the same torch threads: the usable CPUs minus the decode workers (as `unimoe data prep`
sets them), so the workers and the codec do not oversubscribe the cores.
Throughput is audio seconds per wall second; pipeline_over_codec = pipeline / codec_only (target >= 0.8).
Each is timed `repeats` times, alternating, and the best is kept (the machine may be shared).
The last line of output is the JSON object.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

from data_prep.audio import AudioCheckConfig, load_checked
from data_prep.codec import load_codec
from data_prep.fixtures import WORDS, tone
from data_prep.manifest import read_manifest, write_manifest
from data_prep.prep import PrepConfig, _encode_segments, default_threads, prep
from data_prep.shards import _indexed_dataset
from data_prep.text import train_tokenizer

SR = 22050
CLIP_SECONDS = 3.0
MIXED_RANGE = (1.0, 60.0)


def _lengths(kind: str, seconds: float, seed: int = 0) -> list[float]:
    if kind == "uniform":
        return [CLIP_SECONDS] * max(2, math.ceil(seconds / CLIP_SECONDS))
    lo, hi = MIXED_RANGE
    x = np.random.default_rng(seed).uniform(lo, hi, size=max(2, math.ceil(seconds / ((lo + hi) / 2))))
    return [float(v) for v in np.clip(x * seconds / x.sum(), lo, hi)]


def _write_set(root: str, lengths: list[float]) -> str:
    os.makedirs(os.path.join(root, "wavs"), exist_ok=True)
    rng = np.random.default_rng(1)
    entries = []
    for i, sec in enumerate(lengths):
        rel = f"wavs/{i:04d}.wav"
        sf.write(os.path.join(root, rel), tone(sec, SR, 110 + 20 * i, seed=i), SR, subtype="PCM_16")
        entries.append({"id": f"clip_{i:04d}", "task": "speech", "audio": rel,
                        "text": " ".join(rng.choice(WORDS, size=6))})
    path = os.path.join(root, "manifest.jsonl")
    write_manifest(path, entries)
    return path


def _measure(tmp: str, name: str, lengths: list[float], codec, workers: int, repeats: int, log) -> dict:
    root = os.path.join(tmp, name)
    manifest = _write_set(root, lengths)
    items, _, _ = read_manifest(manifest)
    tok = os.path.join(root, "spm.model")
    train_tokenizer([it.text for it in items], tok, vocab_size=64, log=lambda m: None)
    max_seconds = max(30.0, MIXED_RANGE[1])
    cfg_kw = dict(manifest=manifest, tokenizer=tok, codec="random", workers=workers, progress=False,
                  max_seconds=max_seconds, device=str(codec.device))
    ref = PrepConfig(out=os.path.join(root, "ref"), **cfg_kw)
    audio_cfg = AudioCheckConfig(codec.sample_rate, ref.min_seconds, ref.max_seconds)
    wavs = [load_checked(it.audio, audio_cfg) for it in items]
    audio_seconds = sum(len(w) for w in wavs) / codec.sample_rate
    codec_times, pipe_times, timings = [], [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        for b in range(0, len(items), ref.sort_window):  # prep's sort windows, in memory
            _encode_segments(codec, wavs[b : b + ref.sort_window], ref.batch_seconds)
        codec_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cfg = PrepConfig(out=os.path.join(root, f"prep{r}"), **cfg_kw)
        report = prep(cfg, codec=codec, log=lambda m: None)
        pipe_times.append(time.perf_counter() - t0)
        timings.append(report["timing"])
        assert report["accepted"] == len(items), report["rejected"][:3]
        log(f"[bench prep] {name} repeat {r}: codec-only {codec_times[-1]:.2f} s, "
            f"pipeline {pipe_times[-1]:.2f} s")
    codec_tp, pipe_tp = audio_seconds / min(codec_times), audio_seconds / min(pipe_times)
    return {
        "items": len(items),
        "clip_seconds": [round(min(lengths), 2), round(max(lengths), 2)],
        "audio_seconds": round(audio_seconds, 2),
        "sort_window": ref.sort_window,
        "batch_seconds": ref.batch_seconds,
        "codec_only_s": round(min(codec_times), 3),
        "pipeline_s": round(min(pipe_times), 3),
        "codec_only_audio_s_per_s": round(codec_tp, 2),
        "pipeline_audio_s_per_s": round(pipe_tp, 2),
        "pipeline_over_codec": round(pipe_tp / codec_tp, 3),
        # inside the best pipeline run: wall seconds the main process spent per stage
        "pipeline_stage_s": timings[pipe_times.index(min(pipe_times))],
    }


def run(seconds: float = 60.0, mixed_seconds: float = 600.0, workers: int = 1, device: str = "cpu",
        repeats: int = 2, log=print) -> dict:
    tmp = tempfile.mkdtemp(prefix="unimoe-bench-prep-")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(default_threads(workers, device))
        codec = load_codec("random", device=device)
        codec.encode(torch.zeros(1, 1, codec.sample_rate, device=codec.device))  # warm-up
        _indexed_dataset()  # one-time megatron-core import (~5 s), like codec construction, is not timed
        uniform = _measure(tmp, "uniform", _lengths("uniform", seconds), codec, workers, repeats, log)
        result = {
            "benchmark": "prep",
            "codec": "random EnCodec 24 kHz (untrained weights; same architecture/cost as trained)",
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "workers": workers,
            "input_sample_rate": SR,
            "repeats": repeats,
            **uniform,
        }
        if mixed_seconds > 0:
            mixed = _measure(tmp, "mixed", _lengths("mixed", mixed_seconds), codec, workers, repeats, log)
            result["mixed"] = mixed
            result["mixed_pipeline_over_codec"] = mixed["pipeline_over_codec"]
        return result
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


def run_cli(args) -> int:
    seconds = min(args.seconds, 12.0) if args.quick else args.seconds
    mixed = min(args.mixed_seconds, 90.0) if args.quick else args.mixed_seconds
    result = run(seconds=seconds, mixed_seconds=mixed, workers=args.workers, device=args.device,
                 repeats=1 if args.quick else 3)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(result))
    return 0
