"""Indexed shards: megatron-core's indexed dataset (.bin/.idx) for codes and text ids, plus a shard list.

One shard = three files beside each other:
    shard_00003.codes.{bin,idx}   one sequence per item: codes [K, T] flattened row-major (uint16)
    shard_00003.text.{bin,idx}    one sequence per item: sentencepiece ids (int32)
    shard_00003.meta.jsonl        one line per item: id, task, split, seconds, frames, speaker, text
The shard list (shards.json, or shards.slice-I-of-N.json for a job-array slice) names every complete shard
with its items, audio seconds, tokens and the sha256 of each file. Shard files are written under temporary
names and renamed, then the list is rewritten atomically (tmp + rename): a crash mid-shard leaves no partial
shard listed, and a re-run rebuilds exactly the shards that are missing or fail their checksums.

    python -m data_prep.shards merge OUT [--expect N] [--wait]  # slice lists -> shards.json + report
    python -m data_prep.shards verify OUT        # size and sha256 of every listed file (= unimoe data verify)

Each list records `total_shards` (of the whole manifest); the merge refuses to write shards.json unless the
slices cover every index, and names what is missing. Reading is data_prep.shard_reader.
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
SUFFIXES = (".codes.bin", ".codes.idx", ".text.bin", ".text.idx", ".meta.jsonl")
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
        files, sizes = {}, {}
        for suffix in SUFFIXES:
            final = self.name + suffix
            files[final] = sha256_file(self.tmp + suffix)
            sizes[final] = os.path.getsize(self.tmp + suffix)
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
            "sizes": sizes,
        }
        entry.update(extra or {})
        return entry

    def abort(self) -> None:
        self.meta.close()
        for p in glob.glob(self.tmp + ".*"):
            os.remove(p)


def verify_entry(out_dir: str, entry: dict, sha256=sha256_file) -> str | None:
    """None if every file of the shard exists with its recorded size and sha256, else the problem.
    `sha256(path)` hashes one file."""
    sizes = entry.get("sizes", {})
    for fname, digest in entry["files"].items():
        path = os.path.join(out_dir, fname)
        if not os.path.isfile(path):
            return f"missing {fname}"
        if fname in sizes and os.path.getsize(path) != sizes[fname]:
            return f"size of {fname} is {os.path.getsize(path)}, expected {sizes[fname]}"
        if sha256(path) != digest:
            return f"checksum mismatch for {fname}"
    return None


def load_list(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _missing(indices: list[int], total: int) -> list[int]:
    """The shard indices below `total` that `indices` lacks, sorted."""
    return sorted(set(range(total)) - set(indices))


def check_coverage(listing: dict, where: str) -> None:
    """A list that records its total shard count must hold every index below it."""
    total = listing.get("total_shards")
    if total is None:
        return
    missing = _missing([e["index"] for e in listing["shards"]], total)
    if missing:
        raise ValueError(
            f"{where} is incomplete: {len(missing)} of {total} shards missing "
            f"({', '.join(shard_name(k) for k in missing[:8])}{' ...' if len(missing) > 8 else ''}): "
            "prep has not finished; run it (or the missing slices) again"
        )


class MergeError(ValueError):
    """The slices do not add up to the whole manifest; the message names what is missing."""


def merge(out_dir: str, expect: int | None = None, wait: bool = False) -> dict | None:
    """Merge the slice shard lists (and slice reports) into shards.json and prep_report.json.

    A slice is complete when its report exists (prep removes it when the slice starts and writes it last).
    With `wait` (every array task calls the merge; the last one to finish merges), incomplete slices are
    not an error: nothing is written and None is returned. Otherwise, and always once every slice is
    complete, anything missing raises MergeError naming it: slices without a report, slices made from a
    different manifest (another total shard count), shard indices not covered.
    """
    lists = sorted(glob.glob(os.path.join(out_dir, "shards.slice-*-of-*.json")))
    if not lists:
        raise FileNotFoundError(f"no slice lists (shards.slice-*-of-*.json) in {out_dir}")
    counts = {int(_SLICE_RE.search(p).group(2)) for p in lists}
    if len(counts) != 1 or (expect is not None and counts != {expect}):
        raise MergeError(f"slice lists of different job arrays in {out_dir}: N = {sorted(counts)}"
                         + (f", expected {expect}" if expect is not None else ""))
    n = counts.pop()
    names = [list_name(i, n) for i in range(n)]
    incomplete = [i for i in range(n) if not os.path.isfile(os.path.join(out_dir, report_name(i, n)))
                  or not os.path.isfile(os.path.join(out_dir, names[i]))]
    if incomplete:
        what = f"{n - len(incomplete)}/{n} slices complete; incomplete: {_slice_ids(incomplete, n)}"
        if wait:
            print(f"[merge] {what} in {out_dir}; not merging yet")
            return None
        raise MergeError(f"{out_dir}: {what} (no report: not run, still running or crashed): run them "
                         "(`unimoe data prep --slice i/N`), then merge again")
    parts = [load_list(os.path.join(out_dir, name)) for name in names]
    for name, part in zip(names[1:], parts[1:]):
        if part["config"] != parts[0]["config"]:
            raise MergeError(f"{name} was made with another configuration than {names[0]}")
    versions = {i: (part.get("total_shards"), part.get("manifest_key")) for i, part in enumerate(parts)}
    if len(set(versions.values())) != 1 or versions[0][0] is None:
        groups = {}
        for i, v in versions.items():
            groups.setdefault(v, []).append(i)
        desc = "; ".join(f"{_slice_ids(ids, n)}: {total} shards, manifest {key}" for (total, key), ids in
                         sorted(groups.items(), key=lambda kv: kv[1]))
        raise MergeError(f"{out_dir}: the slices were made from different versions of the manifest ({desc}): "
                         "run the slices made before it changed again, then merge")
    total = versions[0][0]
    merged = {k: v for k, v in parts[0].items() if k not in ("shards", "slice")}
    merged["shards"] = sorted((e for part in parts for e in part["shards"]), key=lambda e: e["index"])
    indices = [e["index"] for e in merged["shards"]]
    missing = _missing(indices, total)
    if missing or len(indices) != len(set(indices)):
        raise MergeError(
            f"{out_dir}: {len(missing)} of {total} shards missing after all slices completed "
            f"({', '.join(f'{shard_name(k)} (slice {k % n})' for k in missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}): run those slices again, then merge"
        )
    merged["merged_from"] = names
    reports = [load_list(os.path.join(out_dir, report_name(i, n))) for i in range(n)]
    write_json_atomic(os.path.join(out_dir, REPORT_NAME), merge_reports(reports))
    write_json_atomic(os.path.join(out_dir, LIST_NAME), merged)
    print(f"[merge] {len(merged['shards'])} shards from {n} slices -> {os.path.join(out_dir, LIST_NAME)}")
    return merged


def _slice_ids(slices: list[int], n: int) -> str:
    return ", ".join(f"{i}/{n}" for i in slices[:16]) + (" ..." if len(slices) > 16 else "")


def merge_reports(reports: list[dict]) -> dict:
    summed = ("seen", "accepted", "accepted_lines", "shards", "decoder_restarts")
    out = {k: v for k, v in reports[0].items() if k not in (*summed, "rejected", "tasks", "slice", "timing")}
    for k in summed:
        if all(k in r for r in reports):
            out[k] = sum(r[k] for r in reports)
    out["rejected"] = [x for r in reports for x in r["rejected"]]
    tasks: dict[str, dict] = {}
    for r in reports:
        for task, v in r["tasks"].items():
            t = tasks.setdefault(task, {k: 0 for k in v})
            for k, x in v.items():
                t[k] = t.get(k, 0) + x
    out["tasks"] = tasks
    return out


def verify_dir(out_dir: str, log=print, sha256=sha256_file) -> list[tuple[str, str]]:
    """Full check of a prep output: every listed file's size and sha256, and shard coverage.
    Returns [(shard or list, problem)]. `sha256(path)` hashes one file."""
    path = os.path.join(out_dir, LIST_NAME)
    listing = load_list(path)
    bad = []
    try:
        check_coverage(listing, path)
    except ValueError as e:
        bad.append((LIST_NAME, str(e)))
    for e in listing["shards"]:
        err = verify_entry(out_dir, e, sha256)
        if err:
            bad.append((e["name"], err))
    for name, err in bad:
        log(f"{os.path.join(out_dir, name)}: {err}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.shards")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge slice shard lists into shards.json")
    m.add_argument("out")
    m.add_argument("--expect", type=int, default=None, help="number of slices (default: from the file names)")
    m.add_argument("--wait", action="store_true",
                   help="incomplete slices are not an error: exit 0 without merging (for array tasks)")
    v = sub.add_parser("verify", help="check the size and sha256 of every listed shard file")
    v.add_argument("out")
    args = p.parse_args(argv)
    try:
        if args.cmd == "merge":
            merge(args.out, args.expect, wait=args.wait)
            return 0
        bad = verify_dir(args.out)
        print(f"[verify] {'FAILED' if bad else 'ok'}")
        return 1 if bad else 0
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
