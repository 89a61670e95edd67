"""Tiny corpora for tests and benchmarks: tone/noise clips written in numpy (no espeak-ng needed)."""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf

from data_prep.manifest import write_manifest
from data_prep.music import random_piece, render

WORDS = ["red", "green", "blue", "river", "stone", "quiet", "bright", "morning", "window", "paper"]


def tone(seconds: float, sr: int, freq: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * noise).astype(np.float32)


def write_corpus(root: str, speech: int = 4, music: int = 4, seconds: float = 0.6, sr: int = 16000,
                 seed: int = 0, valid: int = 0, name: str = "manifest.jsonl") -> str:
    """Write `speech` voice-like (tone+noise) and `music` rendered clips and a manifest; returns its path.
    The last `valid` items of each task get split "valid"."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "wavs"), exist_ok=True)
    entries = []
    for task, n in (("speech", speech), ("music", music)):
        for i in range(n):
            item_id = f"{task}_{i:04d}"
            rel = f"wavs/{item_id}.wav"
            if task == "speech":
                wav = tone(seconds, sr, 120 + 40 * i, seed + i)
                text = " ".join(rng.choice(WORDS, size=4))
            else:
                piece = random_piece(rng, seconds, seconds)
                wav = render(piece, rng, sr)
                text = piece.caption(rng)
            sf.write(os.path.join(root, rel), wav, sr, subtype="PCM_16")
            entries.append({"id": item_id, "task": task, "audio": rel, "text": text,
                            "split": "valid" if i >= n - valid else "train"})
    path = os.path.join(root, name)
    write_manifest(path, entries)
    return path
