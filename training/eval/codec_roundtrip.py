"""`unimoe codec roundtrip`: one audio file through a codec and back, with how close it came.

    unimoe codec roundtrip --codec demo IN.wav OUT.wav [--json]
    unimoe codec roundtrip --codec encodec_24khz --codec-checkpoint encodec_24khz-d7cc33bc.th IN.wav OUT.wav

Reads IN (any file soundfile reads; mixed to mono, resampled to the codec's rate), encodes and decodes it,
writes OUT (16-bit WAV at the codec's rate, peak-limited to 1) and prints spectral convergence (SC) and
log-spectral distance (LSD, dB) of the reconstruction against the resampled input (training/eval/spectral.py),
plus encode/decode real-time factors. For speech (`--task speech`, the default), the speech scores of
training/eval/audio_metrics.py (`speech_scores(wav, sr, text=None) -> dict`: DNSMOS, and WER/CER with
`--text`) of the input and of the reconstruction, when that module is installed. A clip that cannot be
scored (silent, non-finite, too short) gets null scores with the reason; the round trip still runs.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

EXIT_ERROR = 2


def speech_scores_or_none(wav: np.ndarray, sr: int, text: str | None) -> dict | None:
    """THE call site of the speech metrics (DNSMOS, WER): training.eval.audio_metrics.speech_scores when that
    module exists, else None (the command then reports SC/LSD only)."""
    try:
        from training.eval.audio_metrics import speech_scores
    except ImportError:
        return None
    return speech_scores(wav, sr, text=text)


def _read_mono(path: str, sample_rate: int) -> np.ndarray:
    import soundfile as sf

    from data_prep.audio import resample, to_mono

    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    return resample(to_mono(wav), sr, sample_rate)


def roundtrip(codec, wav: np.ndarray) -> tuple[np.ndarray, dict]:
    """(reconstruction cut to len(wav), timing) of a mono float clip at codec.sample_rate."""
    import torch

    if len(wav) == 0:
        return np.zeros(0, np.float32), {"frames": 0, "encode_rtf": None, "decode_rtf": None}
    x = torch.from_numpy(np.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))[None, None]
    t0 = time.perf_counter()
    codes = codec.encode(x.to(codec.device))
    t1 = time.perf_counter()
    out = codec.decode(codes)[0, 0, : len(wav)].float().cpu().numpy()
    t2 = time.perf_counter()
    seconds = max(len(wav) / codec.sample_rate, 1e-9)
    return out, {"frames": int(codes.shape[-1]), "encode_rtf": round((t1 - t0) / seconds, 5),
                 "decode_rtf": round((t2 - t1) / seconds, 5)}


def run(codec_name: str, inp: str, out: str, checkpoint: str | None = None, task: str = "speech",
        text: str | None = None, device: str = "cpu") -> dict:
    import soundfile as sf

    from data_prep.codec import load_codec
    from training.eval.spectral import spectral_scores

    codec = load_codec(codec_name, bandwidth=None, checkpoint=checkpoint, device=device)
    wav = _read_mono(inp, codec.sample_rate)
    recon, timing = roundtrip(codec, wav)
    peak = float(np.abs(recon).max()) if recon.size else 0.0
    sf.write(out, recon / peak if peak > 1.0 else recon, codec.sample_rate, subtype="PCM_16")
    result = {"input": inp, "output": out, "codec": codec.info(),
              "seconds": round(len(wav) / codec.sample_rate, 3), **timing,
              **spectral_scores(wav, recon, codec.sample_rate)}
    if task == "speech":
        result["speech_scores"] = {"input": speech_scores_or_none(wav, codec.sample_rate, text),
                                   "reconstruction": speech_scores_or_none(recon, codec.sample_rate, text)}
    return result


def _print(result: dict) -> None:
    c = result["codec"]
    print(f"codec {c['name']} ({c['num_codebooks']} codebooks x {c['codebook_size']} at {c['frame_rate']} "
          f"Hz, fingerprint {c['fingerprint']}); {result['seconds']} s -> {result['frames']} frames -> "
          f"{result['output']}")
    if result["sc"] is None:
        print(f"SC/LSD: not scored: {result['reason']}")
    else:
        print(f"spectral convergence {result['sc']:.4f}, log-spectral distance {result['lsd_db']:.2f} dB")
    if result["frames"]:
        print(f"real-time factor: encode {result['encode_rtf']:.4f}, decode {result['decode_rtf']:.4f}")
    for which, scores in (result.get("speech_scores") or {}).items():
        if scores is not None:
            print(f"speech scores ({which}): {json.dumps(scores)}")


def run_cli(args) -> int:
    import soundfile as sf

    from data_prep.codec import CodecUnavailable

    try:
        result = run(args.codec, args.input, args.output, args.codec_checkpoint, args.task, args.text,
                     args.device)
    except (CodecUnavailable, ValueError) as e:
        print(f"unimoe codec roundtrip: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, sf.LibsndfileError) as e:
        print(f"unimoe codec roundtrip: cannot read {args.input} or write {args.output}: "
              f"{' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0
