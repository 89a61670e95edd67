"""The demo codec's default: fitted once on the demo corpus's train split, cached; the registry's loader.

    path = ensure_demo_codec()       # $UNIMOE_CACHE/codecs/demo-v1/demo_codec.safetensors (file lock)
    codec = load_demo_codec(checkpoint=None)   # that file (fitting it first if absent), or the file given
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

import numpy as np
import torch

from data_prep.demo_codec import DemoCodec, DemoCodecConfig, read_demo_codec, save_demo_codec
from data_prep.demo_codec_fit import FitConfig, fit_demo_codec

FIT_VERSION = "v1"  # the default fit (corpus, settings, algorithm); a new version refits into a new folder


def default_demo_codec_path() -> str:
    from data_prep.demo import cache_base

    return os.path.join(cache_base(), "codecs", f"demo-{FIT_VERSION}", "demo_codec.safetensors")


def _train_split_audio(manifest: str, sample_rate: int) -> list[np.ndarray]:
    from data_prep.audio import decode, resample, to_mono
    from data_prep.manifest import read_manifest

    items, _, _ = read_manifest(manifest)
    out = []
    for it in sorted((it for it in items if it.split == "train"), key=lambda it: it.id):
        wav, sr = decode(it.audio)
        out.append(resample(to_mono(wav), sr, sample_rate))
    return out


def ensure_demo_codec(path: str | None = None, log=None) -> str:
    """The default demo codec file: fitted once on the demo corpus's train split (built if needed), then
    cached; concurrent callers serialise on a file lock. Returns its absolute path."""
    from data_prep.demo import ensure_demo_synth

    log = log or (lambda m: print(m, file=sys.stderr))
    path = os.path.abspath(path or default_demo_codec_path())
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not os.path.isfile(path):
            manifest = ensure_demo_synth(log=log)
            cfg = DemoCodecConfig()
            t0 = time.time()
            wavs = _train_split_audio(manifest, cfg.sample_rate)
            log(f"[demo-codec] fitting once on the demo corpus's train split ({len(wavs)} clips)")
            codec = fit_demo_codec(wavs, cfg, FitConfig())
            save_demo_codec(codec, path)
            frames = codec.fit["frames_used"]
            log(f"[demo-codec] fitted in {time.time() - t0:.1f} s ({frames} frames): {path}")
    return path


def load_demo_codec(name: str = "demo", checkpoint: str | None = None, device: str | torch.device = "cpu",
                    seed: int = 0, bandwidth: float | None = None) -> DemoCodec:
    """The registry's loader: the file `checkpoint`, else the cached fit of the demo corpus (fitted once)."""
    if checkpoint is None:
        checkpoint = ensure_demo_codec()
    codec = read_demo_codec(checkpoint, device)
    if bandwidth is not None and abs(bandwidth - codec.bandwidth) > 1e-6:
        raise ValueError(f"the demo codec {checkpoint} has {codec.num_codebooks} codebooks of "
                         f"{codec.codebook_size} codes at {codec.frame_rate} Hz = {codec.bandwidth} kbps; "
                         f"--bandwidth {bandwidth} does not match it (pass --bandwidth {codec.bandwidth})")
    return codec
