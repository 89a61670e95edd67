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
slices cover every index, and names what is missing. Readers open a shard with a cheap check (file sizes and
the sha256 of the two small .idx files) and keep at most `max_open` shards open (one descriptor each).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import struct
import sys
import warnings
from collections import OrderedDict

import numpy as np

LIST_NAME = "shards.json"
REPORT_NAME = "prep_report.json"
SUFFIXES = (".codes.bin", ".codes.idx", ".text.bin", ".text.idx", ".meta.jsonl")
_SLICE_RE = re.compile(r"shards\.slice-(\d+)-of-(\d+)\.json$")
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


class ShardCheckError(ValueError):
    """A shard file differs from what prep recorded (size or index checksum)."""


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


def verify_entry(out_dir: str, entry: dict) -> str | None:
    """None if every file of the shard exists with its recorded size and sha256, else the problem."""
    sizes = entry.get("sizes", {})
    for fname, digest in entry["files"].items():
        path = os.path.join(out_dir, fname)
        if not os.path.isfile(path):
            return f"missing {fname}"
        if fname in sizes and os.path.getsize(path) != sizes[fname]:
            return f"size of {fname} is {os.path.getsize(path)}, expected {sizes[fname]}"
        if sha256_file(path) != digest:
            return f"checksum mismatch for {fname}"
    return None


def load_list(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_index(data: bytes, name: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """megatron-core's .idx format -> (dtype, lengths int32 [n], byte pointers int64 [n]).

    Layout: b"MMIDIDX\0\0", version <Q (1), dtype code <B, sequence count <Q, document count <Q, lengths
    int32 [n], pointers int64 [n], document indices int64 [d] (megatron.core.datasets.indexed_dataset)."""
    if data[:9] != _IDX_HEADER or struct.unpack_from("<Q", data, 9)[0] != 1:
        raise ValueError(f"{name}: not a megatron-core indexed-dataset index (bad header or version)")
    code = data[17]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{name}: unknown dtype code {code}")
    n = struct.unpack_from("<Q", data, 18)[0]
    lengths = np.frombuffer(data, dtype=np.int32, count=n, offset=34)
    pointers = np.frombuffer(data, dtype=np.int64, count=n, offset=34 + 4 * n)
    return np.dtype(_IDX_DTYPES[code]), lengths, pointers


class OpenShard:
    """One shard open for reading: both .idx files and text.bin read into memory (checked), codes.bin read
    by position through one file descriptor, the only one a shard keeps open.

    `expect` = {"sizes": {file: bytes}, "sha256": {file: hex}}: sizes of the files present there are checked,
    and so are the sha256 of the .idx files (small); the full check of every file is `unimoe data verify`."""

    def __init__(self, prefix: str, num_codebooks: int, expect: dict | None = None):
        self.prefix, self.name, self.num_codebooks = prefix, os.path.basename(prefix), num_codebooks
        self._meta_lines = None
        expect = expect or {}
        for suffix in SUFFIXES:
            want = expect.get("sizes", {}).get(self.name + suffix)
            if want is not None and (size := _size(prefix + suffix)) != want:
                raise ShardCheckError(
                    f"{prefix}{suffix}: {size} bytes, expected {want} (changed or truncated since prep): "
                    "run `unimoe data verify`, then prep/mix again"
                )
        indexes = {}
        for kind in ("codes", "text"):
            fname = f"{self.name}.{kind}.idx"
            with open(f"{prefix}.{kind}.idx", "rb") as f:
                data = f.read()
            want = expect.get("sha256", {}).get(fname)
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                raise ShardCheckError(
                    f"{prefix}.{kind}.idx: sha256 differs from the one recorded at prep/mix time: run "
                    "`unimoe data verify`, then prep/mix again"
                )
            indexes[kind] = read_index(data, fname)
        self.codes_dtype, self.codes_len, self.codes_ptr = indexes["codes"]
        text_dtype, self.text_len, self.text_ptr = indexes["text"]
        with open(prefix + ".text.bin", "rb") as f:
            self.text = np.frombuffer(f.read(), dtype=text_dtype)
        self.text_itemsize = text_dtype.itemsize
        self.fd = os.open(prefix + ".codes.bin", os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.codes_len)

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes [K, T] int64, text_ids [L] int64) of item j."""
        n, size = int(self.codes_len[j]), self.codes_dtype.itemsize
        raw = os.pread(self.fd, n * size, int(self.codes_ptr[j]))
        if len(raw) != n * size:
            raise ShardCheckError(f"{self.name}.codes.bin: item {j} is cut short (file truncated?)")
        codes = np.frombuffer(raw, dtype=self.codes_dtype).astype(np.int64)
        first = int(self.text_ptr[j]) // self.text_itemsize
        text = self.text[first : first + int(self.text_len[j])].astype(np.int64)
        return codes.reshape(self.num_codebooks, -1), text

    def item_id(self, j: int, offset: int | None = None) -> str:
        """The id of item j: its meta.jsonl line read at `offset` (bytes, from the mixture index), or from
        the whole file (read once per opening) when no offset is given."""
        if offset is not None:
            with open(self.prefix + ".meta.jsonl", "rb") as f:
                f.seek(offset)
                return json.loads(f.readline())["id"]
        if self._meta_lines is None:
            with open(self.prefix + ".meta.jsonl", "rb") as f:
                self._meta_lines = f.read().splitlines()
        return json.loads(self._meta_lines[j])["id"]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardCache:
    """At most `max_open` shards open at once (least recently used closed first)."""

    def __init__(self, max_open: int = 64):
        if max_open < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open}")
        self.max_open = max_open
        self._open: OrderedDict = OrderedDict()
        self.opened = 0

    def get(self, key, opener) -> OpenShard:
        shard = self._open.get(key)
        if shard is not None:
            self._open.move_to_end(key)
            return shard
        shard = opener()
        self.opened += 1
        self._open[key] = shard
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return shard

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __len__(self) -> int:
        return len(self._open)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def check_coverage(listing: dict, where: str) -> None:
    """A list that records its total shard count must hold every index below it."""
    total = listing.get("total_shards")
    if total is None:
        return
    have = {e["index"] for e in listing["shards"]}
    missing = sorted(set(range(total)) - have)
    if missing:
        raise ValueError(
            f"{where} is incomplete: {len(missing)} of {total} shards missing "
            f"({', '.join(shard_name(k) for k in missing[:8])}{' ...' if len(missing) > 8 else ''}): "
            "prep has not finished; run it (or the missing slices) again"
        )


class ShardSet:
    """Read access to the shards of one prep output directory; at most `max_open` shards open at once.
    Picklable: a copy opens its own shards."""

    def __init__(self, out_dir: str, max_open: int = 64):
        self.out_dir = os.path.abspath(out_dir)
        path = os.path.join(self.out_dir, LIST_NAME)
        if not os.path.isfile(path):
            slices = glob.glob(os.path.join(self.out_dir, "shards.slice-*.json"))
            hint = " (slice lists found: run `python -m data_prep.shards merge OUT`)" if slices else ""
            raise FileNotFoundError(f"no {LIST_NAME} in {self.out_dir}: run `unimoe data prep` first{hint}")
        self.list = load_list(path)
        check_coverage(self.list, path)
        self.shards = sorted(self.list["shards"], key=lambda e: e["index"])
        self.num_codebooks = int(self.list["codec"]["num_codebooks"])
        self.cache = ShardCache(max_open)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["cache"] = ShardCache(self.cache.max_open)
        return state

    def read_meta(self, s: int) -> list[dict]:
        """The meta.jsonl rows of shard s (id, task, split, seconds, frames, speaker, text)."""
        e = self.shards[s]
        with open(os.path.join(self.out_dir, e["name"] + ".meta.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != e["items"]:
            raise ValueError(f"{e['name']}.meta.jsonl has {len(rows)} rows, shards.json says {e['items']}")
        return rows

    def open(self, s: int) -> OpenShard:
        e = self.shards[s]
        expect = {"sizes": e.get("sizes", {}), "sha256": e["files"]}
        prefix = os.path.join(self.out_dir, e["name"])
        return self.cache.get(s, lambda: OpenShard(prefix, self.num_codebooks, expect))

    def get(self, s: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes [K, T] int64, text_ids [L] int64) of item j of shard s."""
        return self.open(s).get(j)


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
    missing = sorted(set(range(total)) - set(indices))
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


def verify_dir(out_dir: str, log=print) -> list[tuple[str, str]]:
    """Full check of a prep output: every listed file's size and sha256, and shard coverage.
    Returns [(shard or list, problem)]."""
    path = os.path.join(out_dir, LIST_NAME)
    listing = load_list(path)
    bad = []
    try:
        check_coverage(listing, path)
    except ValueError as e:
        bad.append((LIST_NAME, str(e)))
    for e in listing["shards"]:
        err = verify_entry(out_dir, e)
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
