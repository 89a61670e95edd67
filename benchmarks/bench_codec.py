"""`unimoe bench codec`: how well and how fast the codecs reconstruct held-out demo-corpus audio (JSON).

Held-out clips: `unimoe data synth` with another seed than the demo corpus (espeak-ng sentences, rendered
music), none of which the demo codec was fitted on. For each codec (demo, random): mean and range of
spectral convergence and log-spectral distance per task (training/eval/spectral.py), and encode/decode
real-time factors (seconds of compute per second of audio, in this process's torch threads). Also the
demo codec's fit time when this call had to fit it (otherwise null: it was cached).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

HELD_OUT_SEED = 20261205


def _held_out(tmp: str, clips: int) -> list[tuple[str, np.ndarray]]:
    from data_prep.audio import decode, resample, to_mono
    from data_prep.manifest import read_manifest
    from data_prep.synth import synth

    manifest = synth(tmp, clips, clips, seed=HELD_OUT_SEED, valid_fraction=0, progress=False)
    items, _, _ = read_manifest(manifest)
    out = []
    for it in items:
        wav, sr = decode(it.audio)
        out.append((it.task, resample(to_mono(wav), sr, 24000)))
    return out


def _score(codec, clips: list[tuple[str, np.ndarray]]) -> dict:
    from training.eval.codec_roundtrip import roundtrip
    from training.eval.spectral import spectral_scores

    per_task, enc, dec, audio_s = {}, 0.0, 0.0, 0.0
    for task, wav in clips:
        recon, timing = roundtrip(codec, wav)
        seconds = len(wav) / codec.sample_rate
        enc += timing["encode_rtf"] * seconds
        dec += timing["decode_rtf"] * seconds
        audio_s += seconds
        scores = spectral_scores(wav, recon, codec.sample_rate)
        if scores["sc"] is not None:
            per_task.setdefault(task, []).append((scores["sc"], scores["lsd_db"]))
    out = {"encode_rtf": round(enc / audio_s, 5), "decode_rtf": round(dec / audio_s, 5)}
    for task, values in sorted(per_task.items()):
        sc, lsd = np.array(values).T
        out[task] = {"clips": len(values), "sc_mean": round(float(sc.mean()), 4),
                     "sc_range": [round(float(sc.min()), 4), round(float(sc.max()), 4)],
                     "lsd_db_mean": round(float(lsd.mean()), 3),
                     "lsd_db_range": [round(float(lsd.min()), 3), round(float(lsd.max()), 3)]}
    return out


def run(clips: int = 10, log=print) -> dict:
    from data_prep.codec import load_codec
    from data_prep.demo_codec_cache import default_demo_codec_path, ensure_demo_codec

    fitted_here = not os.path.isfile(default_demo_codec_path())
    t0 = time.perf_counter()
    ensure_demo_codec(log=log)
    fit_s = round(time.perf_counter() - t0, 1) if fitted_here else None
    tmp = tempfile.mkdtemp(prefix="unimoe-bench-codec-")
    try:
        held = _held_out(tmp, clips)
        result = {"benchmark": "codec", "torch_threads": torch.get_num_threads(),
                  "held_out_seed": HELD_OUT_SEED, "audio_s": round(sum(len(w) for _, w in held) / 24000, 1),
                  "demo_fit_s": fit_s}
        for name in ("demo", "random"):
            codec = load_codec(name, bandwidth=None)
            result[name] = {"fingerprint": codec.fingerprint(), **_score(codec, held)}
            log(f"[bench codec] {name}: {json.dumps(result[name])}")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_cli(args) -> int:
    result = run(clips=3 if args.quick else args.clips)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    print(json.dumps(result))
    return 0
