"""Reading prepared shards: megatron-core's .idx format, one open shard, a bounded cache of open shards, and
ShardSet (the shards of one prep output directory).

A shard is opened with a cheap check (the sizes of its files, the sha256 of its two small .idx files)
against what prep or the mixture index recorded; the full check is `unimoe data verify`. An open shard
keeps one file descriptor (codes.bin, read by position) and no memory map, and a ShardCache keeps at most
`max_open` of them (least recently used closed first), so a reader over 40k shards stays within `ulimit -n`
and `vm.max_map_count`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections import OrderedDict

import numpy as np

from data_prep.shards import LIST_NAME, SUFFIXES, check_coverage, load_list, sha256_file

_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


class ShardCheckError(ValueError):
    """A shard file differs from what prep recorded (size or index checksum)."""


def check_files(prefix: str, expect: dict | None, sha256=sha256_file) -> list[tuple[str, str, str]]:
    """The cheap check of shard `prefix` against `expect` = {"sizes": {file: bytes}, "sha256": {file: hex}}:
    the sizes recorded there, then the sha256 of the two .idx files (those present; `sha256(path)` hashes
    one). Returns the problems in that order as (path, "size" | "sha256", OpenShard's message)."""
    expect = expect or {}
    name = os.path.basename(prefix)
    advice = "run `unimoe data verify`, then prep/mix again"
    problems = []
    for suffix in SUFFIXES:
        path, want = prefix + suffix, expect.get("sizes", {}).get(name + suffix)
        if want is not None and (size := _size(path)) != want:
            msg = f"{path}: {size} bytes, expected {want} (changed or truncated since prep): {advice}"
            problems.append((path, "size", msg))
    for kind in ("codes", "text"):
        path, want = f"{prefix}.{kind}.idx", expect.get("sha256", {}).get(f"{name}.{kind}.idx")
        if want is not None and os.path.isfile(path) and sha256(path) != want:
            msg = f"{path}: sha256 differs from the one recorded at prep/mix time: {advice}"
            problems.append((path, "sha256", msg))
    return problems


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

    `expect` = {"sizes": {file: bytes}, "sha256": {file: hex}}: check_files, the first problem raised as
    ShardCheckError; the full check of every file is `unimoe data verify`."""

    def __init__(self, prefix: str, num_codebooks: int, expect: dict | None = None):
        self.prefix, self.name, self.num_codebooks = prefix, os.path.basename(prefix), num_codebooks
        read: dict[str, bytes] = {}  # the .idx files check_files hashed: parsed below, not read again

        def sha256(path: str) -> str:
            read[path] = _read(path)
            return hashlib.sha256(read[path]).hexdigest()

        problems = check_files(prefix, expect, sha256)
        if problems:
            raise ShardCheckError(problems[0][2])
        indexes = {}
        for kind in ("codes", "text"):
            path = f"{prefix}.{kind}.idx"
            indexes[kind] = read_index(read[path] if path in read else _read(path), f"{self.name}.{kind}.idx")
        self.codes_dtype, self.codes_len, self.codes_ptr = indexes["codes"]
        text_dtype, self.text_len, self.text_ptr = indexes["text"]
        with open(prefix + ".text.bin", "rb") as f:
            self.text = np.frombuffer(f.read(), dtype=text_dtype)
        self.text_itemsize = text_dtype.itemsize
        self.codes_file = open(prefix + ".codes.bin", "rb", buffering=0)  # closed by close() or the GC

    def __len__(self) -> int:
        return len(self.codes_len)

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes [K, T] int64, text_ids [L] int64) of item j."""
        n, size = int(self.codes_len[j]), self.codes_dtype.itemsize
        raw = os.pread(self.codes_file.fileno(), n * size, int(self.codes_ptr[j]))
        if len(raw) != n * size:
            raise ShardCheckError(f"{self.name}.codes.bin: item {j} is cut short (file truncated?)")
        codes = np.frombuffer(raw, dtype=self.codes_dtype).astype(np.int64)
        first = int(self.text_ptr[j]) // self.text_itemsize
        text = self.text[first : first + int(self.text_len[j])].astype(np.int64)
        return codes.reshape(self.num_codebooks, -1), text

    def item_id(self, offset: int) -> str:
        """The id of an item: its meta.jsonl line, read at `offset` (bytes, from the mixture index)."""
        return self.item_meta(offset)["id"]

    def item_meta(self, offset: int) -> dict:
        """An item's meta.jsonl line (id, task, text, seconds, ...) at `offset` bytes."""
        with open(self.prefix + ".meta.jsonl", "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def close(self) -> None:
        self.codes_file.close()


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


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ShardSet:
    """Read access to the shards of one prep output directory; at most `max_open` shards open at once."""

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
