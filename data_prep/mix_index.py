"""The mixture index: where each item of a mixture lives and how long it is, as compact numpy arrays.

`unimoe data mix` scans the sources' shards once and writes one binary file beside mix.json
(`<mix>.index`); every reader memory-maps it read-only, so all ranks on a node share one copy through the
page cache. Arrays (each with the smallest unsigned dtype that holds its values):

    item_shard [N]       row of the shard table        item_row [N]   item's row in its shard
    item_frames [N]      codec frames (T of codes [K, T])   item_text [N]   text ids
    item_meta [N]        byte offset of the item's line in its shard's meta.jsonl (its id)
    shard_dir [S]        index into mix.json "dirs"    shard_index [S]   k of shard_NNNNN in that dir
    shard_sizes [S, 4]   bytes of codes.bin, codes.idx, text.bin, text.idx (checked when a shard is opened)
    shard_sha256 [S, 2, 32]   sha256 of codes.idx and text.idx (checked when a shard is opened)

Items are grouped by task (tasks sorted; "task_offsets" in mix.json); within a task in source order, then
shard, then row, after the `--max-items` subset. About 12 bytes per item (uint16/32 shard, uint16 row,
frames and text, uint32 meta offset); mix.json records the layout, the file size and its sha256 (checked
in full by `unimoe data verify`).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from data_prep.shard_reader import ShardSet, read_index

ITEM_ARRAYS = ("item_shard", "item_row", "item_frames", "item_text", "item_meta")
SIZED_FILES = (".codes.bin", ".codes.idx", ".text.bin", ".text.idx")  # order of shard_sizes' columns
ALIGN = 64


def _smallest_uint(values: np.ndarray) -> np.ndarray:
    top = int(values.max()) if values.size else 0
    return values.astype(np.min_scalar_type(top) if top > 0 else np.uint8)


def _scan_shard(ss: ShardSet, s: int) -> dict:
    """Per-item task, split, frames and text length of shard s, and its check values."""
    e = ss.shards[s]
    prefix = os.path.join(ss.out_dir, e["name"])
    idx = {}
    for kind in ("codes", "text"):
        with open(f"{prefix}.{kind}.idx", "rb") as f:
            data = f.read()
        idx[kind] = (read_index(data, f"{e['name']}.{kind}.idx")[1], hashlib.sha256(data).digest())
    with open(prefix + ".meta.jsonl", "rb") as f:
        lines = f.read().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines]
    if not (len(rows) == e["items"] == len(idx["codes"][0]) == len(idx["text"][0])):
        raise ValueError(f"{prefix}: meta.jsonl, codes.idx, text.idx and shards.json disagree on the number "
                         "of items")
    return {
        "meta_offset": np.concatenate([[0], np.cumsum([len(line) for line in lines])[:-1]]).astype(np.int64),
        "task": np.array([r["task"] for r in rows], dtype=object),
        "split": np.array([r["split"] for r in rows], dtype=object),
        "frames": idx["codes"][0] // ss.num_codebooks,
        "text": idx["text"][0].copy(),
        "sizes": [os.path.getsize(prefix + suffix) for suffix in SIZED_FILES],
        "sha256": [idx["codes"][1], idx["text"][1]],
    }


def item_counts(ss: ShardSet) -> dict[tuple[str, str], int]:
    """{(task, split): items} of a prepared directory (to say what a source holds when it lacks something)."""
    counts: dict[tuple[str, str], int] = {}
    for s in range(len(ss.shards)):
        sc = _scan_shard(ss, s)
        for key in zip(sc["task"], sc["split"]):
            counts[key] = counts.get(key, 0) + 1
    return counts


def build_arrays(sources: list[tuple[str, str]], split: str, tasks: list[str], seed: int,
                 max_items: int | None) -> tuple[dict, dict, list[str], dict]:
    """Scan the shards of sources [(task, dir)] -> (arrays, task_offsets, dirs (absolute), {dir: ShardSet}).
    A directory named by several sources is scanned and listed once."""
    dirs = list(dict.fromkeys(os.path.abspath(d) for _, d in sources))
    sets = {d: ShardSet(d) for d in dirs}
    table: dict[tuple[int, int], int] = {}
    shard_dir, shard_index, shard_sizes, shard_sha = [], [], [], []
    scans: dict[tuple[int, int], dict] = {}
    for d_i, d in enumerate(dirs):
        for s, e in enumerate(sets[d].shards):
            scans[d_i, s] = _scan_shard(sets[d], s)
            table[d_i, s] = len(shard_dir)
            shard_dir.append(d_i)
            shard_index.append(e["index"])
            shard_sizes.append(scans[d_i, s]["sizes"])
            shard_sha.append(np.frombuffer(b"".join(scans[d_i, s]["sha256"]), dtype=np.uint8).reshape(2, 32))
    per_task: dict[str, list] = {t: [] for t in tasks}
    for task, d in sources:
        d_i = dirs.index(os.path.abspath(d))
        for s in range(len(sets[dirs[d_i]].shards)):
            sc = scans[d_i, s]
            rows = np.flatnonzero((sc["task"] == task) & (sc["split"] == split))
            if rows.size:
                cols = [np.full(rows.size, table[d_i, s]), rows, sc["frames"][rows], sc["text"][rows],
                        sc["meta_offset"][rows]]
                per_task[task].append(np.stack(cols, axis=1).astype(np.int64))
    blocks, offsets, start = [], {}, 0
    for t_idx, t in enumerate(tasks):
        items = np.zeros((0, len(ITEM_ARRAYS)), dtype=np.int64)
        if per_task[t]:
            items = np.concatenate(per_task[t])
        if max_items is not None and len(items) > max_items:
            keep = np.sort(np.random.default_rng([seed, t_idx, 1 << 30]).permutation(len(items))[:max_items])
            items = items[keep]
        blocks.append(items)
        offsets[t] = (start, start + len(items))
        start += len(items)
    items = np.concatenate(blocks)
    arrays = {name: _smallest_uint(items[:, c]) for c, name in enumerate(ITEM_ARRAYS)}
    arrays["shard_dir"] = _smallest_uint(np.asarray(shard_dir, dtype=np.int64))
    arrays["shard_index"] = _smallest_uint(np.asarray(shard_index, dtype=np.int64))
    arrays["shard_sizes"] = np.asarray(shard_sizes, dtype=np.uint64).reshape(-1, len(SIZED_FILES))
    arrays["shard_sha256"] = np.asarray(shard_sha, dtype=np.uint8).reshape(-1, 2, 32)
    return arrays, offsets, dirs, sets


def write_index(path: str, arrays: dict) -> dict:
    """One file of the arrays back to back (64-byte aligned); returns its layout for mix.json."""
    layout, offset = {}, 0
    tmp = f"{path}.tmp.{os.getpid()}"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for name, a in arrays.items():
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            h.update(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(a).tobytes()
            f.write(data)
            h.update(data)
            layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
            offset += len(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": os.path.basename(path), "bytes": offset, "sha256": h.hexdigest(), "arrays": layout}


def open_index(path: str, info: dict) -> dict:
    """Memory-map the index file (read-only, shared through the page cache) -> {name: array view}.
    Checks its size (cheap); the full sha256 is `unimoe data verify`."""
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size != info["bytes"]:
        raise ValueError(f"mixture index {path}: {size} bytes, mix.json says {info['bytes']} (missing, or "
                         "written by another `unimoe data mix`): run `unimoe data mix` again")
    if size == 0:
        return {n: np.zeros(a["shape"], dtype=a["dtype"]) for n, a in info["arrays"].items()}
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, a in info["arrays"].items():
        dtype = np.dtype(a["dtype"])
        count = int(np.prod(a["shape"]))
        out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=a["offset"]).reshape(a["shape"])
    return out


def sha256_hex(digest_row: np.ndarray) -> str:
    return bytes(np.asarray(digest_row, dtype=np.uint8)).hex()


def shard_expect(arrays: dict, t: int, name: str) -> dict:
    """The check values recorded for row t of the shard table, in OpenShard's `expect` form."""
    sizes = arrays["shard_sizes"][t]
    sha = arrays["shard_sha256"][t]
    return {
        "sizes": {name + suffix: int(n) for suffix, n in zip(SIZED_FILES, sizes)},
        "sha256": {f"{name}.codes.idx": sha256_hex(sha[0]), f"{name}.text.idx": sha256_hex(sha[1])},
    }


