"""Tiny corpora for tests and benchmarks: tone/noise clips written in numpy (no espeak-ng needed), and
synthetic shard sets (many items, no audio) for the reader."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import soundfile as sf

from data_prep.manifest import write_manifest
from data_prep.music import random_piece, render
from data_prep.shards import LIST_NAME, SUFFIXES, sha256_file, shard_name, write_json_atomic

NUM_CODEBOOKS = 8
SYNTHETIC_CODEC = {"name": "synthetic", "trained": False, "fingerprint": "synthetic",
                   "num_codebooks": NUM_CODEBOOKS, "codebook_size": 1024, "sample_rate": 24000,
                   "frame_rate": 75, "bandwidth": 6.0}
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


def corpus_with_tokenizer(root: str, speech: int = 4, music: int = 4, seconds: float = 0.6,
                          vocab_size: int = 64, **kw) -> tuple[str, str]:
    """write_corpus plus a tokenizer trained on its texts: (manifest path, root/spm.model)."""
    from data_prep.text import train_tokenizer

    manifest = write_corpus(root, speech=speech, music=music, seconds=seconds, **kw)
    with open(manifest, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = os.path.join(root, "spm.model")
    train_tokenizer(texts, tok, vocab_size=vocab_size, log=lambda m: None)
    return manifest, tok


def write_indexed(prefix: str, flat: np.ndarray, lengths: np.ndarray) -> None:
    """The .bin/.idx pair that megatron-core's IndexedDatasetBuilder writes for one item per document
    (add_item + end_document per item), written with numpy in one go."""
    flat.tofile(prefix + ".bin")
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[flat.dtype]
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]) * flat.dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def write_synthetic_shard(out: str, k: int, first: int, n: int, rng) -> dict:
    """Shard k with items first ... first + n - 1 (alternately speech and music) and its shards.json entry."""
    name = shard_name(k)
    prefix = os.path.join(out, name)
    frames = rng.integers(4, 33, size=n)
    text_len = rng.integers(4, 40, size=n)
    write_indexed(prefix + ".codes", rng.integers(0, 1024, size=int(frames.sum()) * NUM_CODEBOOKS,
                                                   dtype=np.uint16), frames * NUM_CODEBOOKS)
    write_indexed(prefix + ".text", rng.integers(5, 64, size=int(text_len.sum()), dtype=np.int32), text_len)
    tasks = {}
    with open(prefix + ".meta.jsonl", "w") as f:
        for j in range(n):
            task = ("speech", "music")[(first + j) % 2]
            tasks[task] = tasks.get(task, 0) + 1
            row = {"id": f"item_{first + j:08d}", "task": task, "split": "train",
                   "seconds": round(int(frames[j]) / 75, 4), "speaker": None, "text": "synthetic",
                   "frames": int(frames[j]), "num_codebooks": NUM_CODEBOOKS}
            f.write(json.dumps(row) + "\n")
    files = {name + s: sha256_file(prefix + s) for s in SUFFIXES}
    sizes = {name + s: os.path.getsize(prefix + s) for s in SUFFIXES}
    return {"index": k, "name": name, "items": n, "files": files, "sizes": sizes, "input": "synthetic",
            "seen": n, "rejected": [], "tasks": {t: {"items": c} for t, c in tasks.items()}}


def write_synthetic_shards(out: str, items: int, shards: int, seed: int = 0) -> None:
    """`items` items in `shards` shards and the shards.json of a complete prep: random codes of 4-32 frames
    (8 codebooks, 1024 codes), 4-39 text ids in [5, 64), alternately speech and music, all split train."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    per = -(-items // shards)
    entries = [write_synthetic_shard(out, k, k * per, min(per, items - k * per), rng) for k in range(shards)]
    listing = {"version": 2, "codec": SYNTHETIC_CODEC, "config": {}, "slice": [0, 1], "total_shards": shards,
               "tokenizer": {"path": os.path.join(out, "spm.model"), "vocab_size": 64, "sha256": "synthetic"},
               "shards": entries}
    write_json_atomic(os.path.join(out, LIST_NAME), listing)


def write_synthetic_mix(root: str, items: int = 64, shards: int = 2) -> str:
    """A training-ready mixture without audio or codec: synthetic shards under root/prep, a 64-piece
    tokenizer beside them (their text ids lie in [5, 64)), and root/mix.json (speech and music 1:1).
    Returns the mix.json path (`data.train=` of a config)."""
    from data_prep.mix import build_mix
    from data_prep.text import train_tokenizer

    prep = os.path.join(root, "prep")
    write_synthetic_shards(prep, items, shards)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(64)]
    train_tokenizer(texts, os.path.join(prep, "spm.model"), vocab_size=64, log=lambda m: None)
    mix = os.path.join(root, "mix.json")
    build_mix([("speech", prep), ("music", prep)], mix, ratio={"speech": 1.0, "music": 1.0})
    return mix
