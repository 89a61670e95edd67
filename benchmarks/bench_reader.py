"""`unimoe bench reader [--json] [--quick] [--items N] [--shards S] [--max-open-shards M]`: the mixture
reader at scale.

1. Writes N synthetic items in S shards, in megatron-core's indexed-dataset format as prep's ShardWriter
   writes it (the same bytes; numpy writes them in one go here), with small codes (8 codebooks of 4-32
   frames, so the files stay small; the reader's costs do not depend on the frame count), half speech and
   half music, and a shards.json as prep writes it.
2. Builds the mixture index with `unimoe data mix`'s build_mix: index_bytes_per_item (the index file over
   N, the shard table included), index_item_bytes (the per-item arrays alone) and the build time.
3. Random access, in a fresh process: `random_reads` samples at random indices of the first epoch through
   MixtureReader(max_open_shards=M) (nearly every read opens a shard: the worst case for the cache):
   samples/s, and the most file descriptors (open_files_max, /proc/self/fd) and memory maps (maps_max,
   /proc/self/maps) the process held meanwhile, with the counts before the reader (baseline_open_files)
   and after its first read (baseline_maps: the index mapped, libraries loaded), and the
   memory the reader wrote (Private_Dirty, per item: what each rank pays; the index map is shared).
4. Padding: on a LibriTTS-like length distribution (durations log-normal, median 4.5 s, 0.5-35 s; 75
   frames/s; 4 text ids/s), the padding fraction of fixed-count micro-batches (`micro_batch` consecutive
   samples) against token-budget micro-batches (training.data.plan_token_step, budget = micro_batch x the
   mean sequence length, window 2048 samples, 8 and 64 micro-batches per step: more micro-batches per step
   sort finer), and real tokens per micro-batch.
The last line of output is the JSON object.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np

from data_prep.fixtures import write_synthetic_shards
from data_prep.mix import MixtureReader, build_mix


def _count(path: str) -> int:
    return len(os.listdir(path)) if path.endswith("fd") else sum(1 for _ in open(path))


def _private_dirty_kb() -> int:
    """Memory this process wrote (heap, anonymous maps): what each rank pays alone; a read-only file map
    (the index) is not in it."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def random_access(mix: str, reads: int, max_open: int, seed: int = 0) -> dict:
    import data_prep.codec  # noqa: F401  (torch: ~130 MB written once per process, not the reader's cost)

    base_fd, base_dirty = _count("/proc/self/fd"), _private_dirty_kb()
    reader = MixtureReader(mix, max_open_shards=max_open)
    idx = np.random.default_rng(seed).integers(0, len(reader), size=reads)  # within one epoch
    reader[0]  # maps the index (and loads the libraries a first read needs)
    base_maps = _count("/proc/self/maps")
    fd_max, maps_max = 0, 0
    t0 = time.perf_counter()
    for n, i in enumerate(idx):
        reader[int(i)]
        if n % 64 == 0:
            fd_max = max(fd_max, _count("/proc/self/fd"))
            maps_max = max(maps_max, _count("/proc/self/maps"))
    dt = time.perf_counter() - t0
    private = (_private_dirty_kb() - base_dirty) * 1024  # the permutations, open shards, Python objects
    out = {"random_reads": reads, "random_samples_per_s": round(reads / dt, 1),
           "reader_private_bytes_per_item": round(private / sum(reader.mix["counts"].values()), 2),
           "open_files_max": max(fd_max, _count("/proc/self/fd")), "maps_max": maps_max,
           "baseline_open_files": base_fd, "baseline_maps": base_maps, "shards_opened": reader.shards.opened,
           "open_shards_at_end": len(reader.shards)}
    reader.close()
    return out


def _fresh_process(fn, *args):
    """fn(*args) in a new interpreter (spawn): its counts of descriptors, maps and written memory are the
    reader's, not what building the shards and the index left in this process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def libritts_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Sequence lengths (text ids + frames + 11 for <task>, <sep> and an 8-codebook delay pattern)."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(4.5), 0.75, size=n), 0.5, 35.0)
    return np.round(seconds * 75).astype(np.int64) + np.round(seconds * 4).astype(np.int64) + 11


def _token_budget(lengths: np.ndarray, budget: int, per_step: int, window: int) -> tuple[float, float, float]:
    """(padding fraction, real tokens and samples per micro-batch) of token-budget steps over `lengths`."""
    from training.data import plan_token_step

    pos, real, total, batches = 0, 0, 0, 0
    while pos + window <= len(lengths):
        used, groups = plan_token_step(lengths[pos : pos + window], budget, per_step)
        for g in groups:
            seq = lengths[pos + g]
            real += int(seq.sum())
            total += int(seq.max()) * len(g)
            batches += 1
        pos += used
    return 1 - real / total, real / batches, pos / batches


def padding(n: int = 200_000, micro_batch: int = 16, window: int = 2048) -> dict:
    lengths = libritts_like_lengths(n)
    fixed = lengths[: n // micro_batch * micro_batch].reshape(-1, micro_batch)
    fixed_total = fixed.max(axis=1).sum() * micro_batch
    budget = int(micro_batch * lengths.mean())
    out = {
        "length_distribution": "LibriTTS-like: log-normal seconds (median 4.5 s, sigma 0.75, 0.5-35 s)",
        "fixed_micro_batch": micro_batch,
        "fixed_padding_fraction": round(float(1 - fixed.sum() / fixed_total), 4),
        "fixed_real_tokens_per_micro_batch": round(float(fixed.sum(axis=1).mean()), 1),
        "token_budget": budget,
    }
    for per_step, suffix in ((8, ""), (64, "_64_per_step")):  # micro-batches per step (dp x accumulation)
        pad, real, samples = _token_budget(lengths, budget, per_step, window)
        out[f"token_budget_padding_fraction{suffix}"] = round(pad, 4)
        out[f"token_budget_real_tokens_per_micro_batch{suffix}"] = round(real, 1)
        out[f"token_budget_samples_per_micro_batch{suffix}"] = round(samples, 2)
    return out


def run(items: int = 1_000_000, shards: int = 2000, max_open: int = 64, reads: int = 20_000,
        log=print) -> dict:
    tmp = tempfile.mkdtemp(prefix="unimoe-bench-reader-")
    try:
        prep_dir, mix = os.path.join(tmp, "prep"), os.path.join(tmp, "mix.json")
        t0 = time.perf_counter()
        write_synthetic_shards(prep_dir, items, shards)
        log(f"[bench reader] wrote {items} items in {shards} shards in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        info = build_mix([("speech", prep_dir), ("music", prep_dir)], mix, ratio={"speech": 1, "music": 1})
        build_s = time.perf_counter() - t0
        log(f"[bench reader] mixture index built in {build_s:.1f} s")
        result = {
            "benchmark": "reader",
            "items": items,
            "shards": shards,
            "max_open_shards": max_open,
            "index_bytes": info["index"]["bytes"],
            "index_bytes_per_item": round(info["index"]["bytes"] / items, 2),
            "index_item_bytes": sum(np.dtype(a["dtype"]).itemsize for k, a in info["index"]["arrays"].items()
                                    if k.startswith("item_")),  # the per-item arrays (the rest: per shard)
            "index_dtypes": {k: v["dtype"] for k, v in info["index"]["arrays"].items()
                             if k.startswith("item_")},
            "index_build_s": round(build_s, 2),
            **_fresh_process(random_access, mix, reads, max_open),
            **padding(),
        }
        result["open_files_bound"] = max_open + 16
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_cli(args) -> int:
    items, shards = args.items, args.shards
    if args.quick:
        items, shards = min(items, 20_000), min(shards, 100)
    reads = args.reads if args.reads is not None else (2000 if args.quick else 20_000)
    result = run(items, shards, args.max_open_shards, reads=reads)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>40}: {v}")
    print(json.dumps(result))
    return 0
