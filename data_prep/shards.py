"""Indexed shards: megatron-core's indexed dataset (.bin/.idx) for codes and text ids, plus a shard list.

One shard = three files beside each other:
    shard_00003.codes.{bin,idx}   one sequence per item: codes [K, T] flattened row-major (uint16)
    shard_00003.text.{bin,idx}    one sequence per item: sentencepiece ids (int32)
    shard_00003.meta.jsonl        one line per item: id, task, split, seconds, frames, speaker, text
The shard list (shards.json, or shards.slice-I-of-N.json for a job-array slice) names every complete shard
with its items, audio seconds, tokens and the sha256 of each file. Shard files are written under temporary
names and renamed, then the list is rewritten atomically (tmp + rename): a crash mid-shard leaves no partial
shard listed, and a re-run rebuilds exactly the shards that are missing or fail their checksums.

    python -m data_prep.shards merge OUT [--expect N]   # slice lists -> shards.json + prep_report.json
    python -m data_prep.shards verify OUT               # check every listed file's sha256
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
import warnings

import numpy as np

LIST_NAME = "shards.json"
REPORT_NAME = "prep_report.json"
_SLICE_RE = re.compile(r"shards\.slice-(\d+)-of-(\d+)\.json$")


def _indexed_dataset():
    with warnings.catch_warnings():  # megatron-core warns about missing apex / transformer-engine on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_name(slice_index: int, num_slices: int) -> str:
    return LIST_NAME if num_slices == 1 else f"shards.slice-{slice_index:05d}-of-{num_slices:05d}.json"


def report_name(slice_index: int, num_slices: int) -> str:
    return REPORT_NAME if num_slices == 1 else f"prep_report.slice-{slice_index:05d}-of-{num_slices:05d}.json"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


class ShardWriter:
    """Collects one shard's items; finalize() writes the files atomically and returns its list entry."""

    def __init__(self, out_dir: str, index: int, codes_dtype=np.uint16):
        self.out_dir, self.index, self.name = out_dir, index, shard_name(index)
        self.tmp = os.path.join(out_dir, f".tmp.{self.name}.{os.getpid()}")
        ind = _indexed_dataset()
        self.codes = ind.IndexedDatasetBuilder(self.tmp + ".codes.bin", dtype=codes_dtype)
        self.text = ind.IndexedDatasetBuilder(self.tmp + ".text.bin", dtype=np.int32)
        self.meta = open(self.tmp + ".meta.jsonl", "w", encoding="utf-8")
        self.items, self.seconds, self.tokens, self.text_tokens = 0, 0.0, 0, 0
        self.tasks: dict[str, dict] = {}

    def add(self, meta: dict, codes: np.ndarray, text_ids: np.ndarray) -> None:
        """meta: id, task, split, seconds, ...; codes [K, T] ints; text_ids [L] ints."""
        import torch

        self.codes.add_item(torch.from_numpy(np.ascontiguousarray(codes).reshape(-1).astype(np.int64)))
        self.codes.end_document()
        self.text.add_item(torch.from_numpy(np.asarray(text_ids, dtype=np.int64)))
        self.text.end_document()
        meta = dict(meta, frames=int(codes.shape[1]), num_codebooks=int(codes.shape[0]))
        self.meta.write(json.dumps(meta, ensure_ascii=False) + "\n")
        self.items += 1
        self.seconds += meta["seconds"]
        self.tokens += int(codes.size)
        self.text_tokens += len(text_ids)
        t = self.tasks.setdefault(meta["task"], {"items": 0, "seconds": 0.0, "tokens": 0, "text_tokens": 0})
        t["items"] += 1
        t["seconds"] += meta["seconds"]
        t["tokens"] += int(codes.size)
        t["text_tokens"] += len(text_ids)

    def finalize(self, extra: dict | None = None) -> dict:
        self.codes.finalize(self.tmp + ".codes.idx")
        self.text.finalize(self.tmp + ".text.idx")
        self.meta.close()
        files = {}
        for suffix in (".codes.bin", ".codes.idx", ".text.bin", ".text.idx", ".meta.jsonl"):
            final = self.name + suffix
            files[final] = sha256_file(self.tmp + suffix)
            os.replace(self.tmp + suffix, os.path.join(self.out_dir, final))
        entry = {
            "index": self.index,
            "name": self.name,
            "items": self.items,
            "seconds": round(self.seconds, 3),
            "tokens": self.tokens,
            "text_tokens": self.text_tokens,
            "tasks": {k: dict(v, seconds=round(v["seconds"], 3)) for k, v in sorted(self.tasks.items())},
            "files": files,
        }
        entry.update(extra or {})
        return entry

    def abort(self) -> None:
        self.meta.close()
        for p in glob.glob(self.tmp + ".*"):
            os.remove(p)


def verify_entry(out_dir: str, entry: dict) -> str | None:
    """None if every file of the shard exists with its recorded sha256, else the problem."""
    for fname, digest in entry["files"].items():
        path = os.path.join(out_dir, fname)
        if not os.path.isfile(path):
            return f"missing {fname}"
        if sha256_file(path) != digest:
            return f"checksum mismatch for {fname}"
    return None


def load_list(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ShardSet:
    """Read access to the shards of one prep output directory (lazy mmap; picklable before first use)."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        path = os.path.join(self.out_dir, LIST_NAME)
        if not os.path.isfile(path):
            slices = glob.glob(os.path.join(self.out_dir, "shards.slice-*.json"))
            hint = " (slice lists found: run `python -m data_prep.shards merge OUT`)" if slices else ""
            raise FileNotFoundError(f"no {LIST_NAME} in {self.out_dir}: run `unimoe data prep` first{hint}")
        self.list = load_list(path)
        self.shards = sorted(self.list["shards"], key=lambda e: e["index"])
        self.meta: list[list[dict]] = []
        for e in self.shards:
            with open(os.path.join(self.out_dir, e["name"] + ".meta.jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if len(rows) != e["items"]:
                raise ValueError(
                    f"{e['name']}.meta.jsonl has {len(rows)} rows, shards.json says {e['items']}"
                )
            self.meta.append(rows)
        self._open: dict[int, tuple] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def _datasets(self, s: int):
        if s not in self._open:
            ind = _indexed_dataset()
            prefix = os.path.join(self.out_dir, self.shards[s]["name"])
            self._open[s] = (ind.IndexedDataset(prefix + ".codes"), ind.IndexedDataset(prefix + ".text"))
        return self._open[s]

    def get(self, s: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes [K, T] int64, text_ids [L] int64) of item j of shard s."""
        codes_ds, text_ds = self._datasets(s)
        meta = self.meta[s][j]
        codes = np.asarray(codes_ds[j], dtype=np.int64).reshape(meta["num_codebooks"], meta["frames"])
        return codes, np.asarray(text_ds[j], dtype=np.int64)


def merge(out_dir: str, expect: int | None = None) -> dict | None:
    """Merge slice shard lists (and slice reports) into shards.json and prep_report.json.

    Returns the merged list, or None (and writes nothing) while fewer than `expect` (default: the N in the
    slice file names) slice lists exist: every array task may call this; the last one to finish merges.
    """
    lists = sorted(glob.glob(os.path.join(out_dir, "shards.slice-*-of-*.json")))
    if not lists:
        raise FileNotFoundError(f"no slice lists (shards.slice-*-of-*.json) in {out_dir}")
    counts = {int(_SLICE_RE.search(p).group(2)) for p in lists}
    if len(counts) != 1:
        raise ValueError(f"slice lists of different job arrays in {out_dir}: N = {sorted(counts)}")
    n = expect or counts.pop()
    done = [p for p in lists if os.path.isfile(p.replace("shards.slice-", "prep_report.slice-"))]
    if len(done) < n:
        print(f"[merge] {len(done)}/{n} slices complete in {out_dir}; not merging yet")
        return None
    parts = [load_list(p) for p in done]
    for p, part in zip(done[1:], parts[1:]):
        if part["config"] != parts[0]["config"]:
            raise ValueError(f"{p} was made with another configuration than {done[0]}")
    merged = {k: v for k, v in parts[0].items() if k not in ("shards", "slice")}
    merged["shards"] = sorted((e for part in parts for e in part["shards"]), key=lambda e: e["index"])
    merged["merged_from"] = [os.path.basename(p) for p in done]
    reports = [load_list(p.replace("shards.slice-", "prep_report.slice-")) for p in done]
    write_json_atomic(os.path.join(out_dir, REPORT_NAME), merge_reports(reports))
    write_json_atomic(os.path.join(out_dir, LIST_NAME), merged)
    print(
        f"[merge] {len(merged['shards'])} shards from {len(done)} slices -> "
        f"{os.path.join(out_dir, LIST_NAME)}"
    )
    return merged


def merge_reports(reports: list[dict]) -> dict:
    out = {k: v for k, v in reports[0].items() if k not in ("seen", "accepted", "rejected", "tasks", "slice")}
    out["seen"] = sum(r["seen"] for r in reports)
    out["accepted"] = sum(r["accepted"] for r in reports)
    out["rejected"] = [x for r in reports for x in r["rejected"]]
    tasks: dict[str, dict] = {}
    for r in reports:
        for task, v in r["tasks"].items():
            t = tasks.setdefault(task, {k: 0 for k in v})
            for k, x in v.items():
                t[k] = t.get(k, 0) + x
    out["tasks"] = tasks
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.shards")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge slice shard lists into shards.json")
    m.add_argument("out")
    m.add_argument("--expect", type=int, default=None, help="number of slices (default: from the file names)")
    v = sub.add_parser("verify", help="check the sha256 of every listed shard file")
    v.add_argument("out")
    args = p.parse_args(argv)
    try:
        if args.cmd == "merge":
            merge(args.out, args.expect)
            return 0
        bad = [
            (e["name"], err)
            for e in load_list(os.path.join(args.out, LIST_NAME))["shards"]
            if (err := verify_entry(args.out, e))
        ]
        for name, err in bad:
            print(f"{name}: {err}")
        print(f"[verify] {'FAILED' if bad else 'ok'}")
        return 1 if bad else 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
