"""The speech/music mixture: mix.json and MixtureReader, deterministic and resumable by sample index.

`unimoe data mix --source speech=DIR --source music=DIR (--ratio speech=1,music=1 | --temperature T)
 [--split train] [--max-items N] [--seed S] --out mix.json`

Target weights: `--ratio` gives them directly; `--temperature T` sets w_t proportional to n_t ** (1/T)
(T=1: natural proportions, larger T: flatter). Which task sample i belongs to is a deterministic
low-discrepancy interleave: with weight w = a/b (exact fraction) for the first task, the number of its
samples among indices [0, i) is floor((i*a + b//2) / b), so every window of any length L holds w*L +- 1 of
them (1000-sample windows: within 0.1 points of the target). The k-th sample of task t is item
perm(seed, t, k // n_t)[k % n_t]: a fresh seeded permutation per task and per pass, so the smaller side is
upsampled (re-visited in a new order) while the larger side is seen once per epoch. reader[i] depends
only on (seed, i): training resumes at an exact position with no state but i.

Splits: prep keeps each item's manifest `split` ("train" by default); a mix selects one split (`--split`,
default train; the demo also writes valid mixes). `--max-items N` keeps a seeded subset of N items per
task (the small balanced seed set of curriculum stage 2). len(reader) is one epoch: the smallest length
in which every item of the most demanding task appears once; indices past it continue into later epochs.

Files: mix.json (settings, weights, counts; source directories and the tokenizer relative to mix.json's
folder, so moving the data root with its mixes keeps them readable) and `<mix>.index` beside it, the
memory-mapped arrays that locate every item (data_prep.mix_index). The reader opens shards on demand, at
most `max_open_shards` at a time (least recently used closed first), each checked cheaply when opened.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from fractions import Fraction

import numpy as np

from data_prep.manifest import TASKS
from data_prep.mix_index import build_arrays, item_counts, open_index, shard_expect, write_index
from data_prep.shard_reader import OpenShard, ShardCache
from data_prep.shards import shard_name, write_json_atomic

MAX_DENOMINATOR = 1_000_000
MIX_VERSION = 2


def _weights(
    counts: dict[str, int], ratio: dict[str, float] | None, temperature: float | None
) -> dict[str, float]:
    if ratio is not None:
        missing = set(counts) - set(ratio)
        extra = set(ratio) - set(counts)
        if missing or extra:
            raise ValueError(
                f"--ratio must name exactly the source tasks {sorted(counts)}; got {sorted(ratio)}"
            )
        if any(v <= 0 for v in ratio.values()):
            raise ValueError(f"--ratio values must be > 0, got {ratio}")
        raw = dict(ratio)
    else:
        if temperature is None or temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}")
        raw = {t: n ** (1.0 / temperature) for t, n in counts.items()}
    total = sum(raw.values())
    return {t: raw[t] / total for t in sorted(raw)}


def _tokenizer_key(listing: dict) -> str:
    tok = listing["tokenizer"]
    return tok.get("sha256") or tok["path"]


def _what_sources_hold(sources, sets, empty: list[str], split: str) -> list[str]:
    """One line per source of an empty task: what its directory holds instead (a swapped --source, another
    split)."""
    lines = []
    for task, d in sources:
        if task not in empty:
            continue
        held = item_counts(sets[os.path.abspath(d)])
        what = ", ".join(f"{n} {t}/{s}" for (t, s), n in sorted(held.items())) or "no items"
        hint = ""
        if any(t == task for t, _ in held):
            hint = f" (other splits: `--split`; import with --valid-fraction for a '{split}' split)" \
                if split == "valid" else " (other splits: `--split`)"
        elif held:
            hint = " (another task's data: swapped --source?)"
        lines.append(f"--source {task}={d} holds {what} (task/split){hint}")
    return lines


def build_mix(
    sources: list[tuple[str, str]],
    out: str,
    ratio: dict[str, float] | None = None,
    temperature: float | None = None,
    seed: int = 0,
    split: str = "train",
    max_items: int | None = None,
) -> dict:
    """Write mix.json and its index for sources [(task, prep_dir)]; returns the content of mix.json."""
    if not sources:
        raise ValueError("no --source given")
    for task, d in sources:
        if task not in TASKS:
            raise ValueError(f"--source {task}={d}: task must be one of {', '.join(TASKS)}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"--max-items must be >= 1, got {max_items}")
    tasks = sorted({t for t, _ in sources})
    arrays, offsets, dirs, sets = build_arrays(sources, split, tasks, seed, max_items)
    first = sets[dirs[0]].list
    for d in dirs[1:]:
        if sets[d].list["codec"].get("fingerprint") != first["codec"].get("fingerprint"):
            raise ValueError(f"{d} was encoded with another codec than {dirs[0]}")
        if _tokenizer_key(sets[d].list) != _tokenizer_key(first):
            raise ValueError(f"{d} used tokenizer {sets[d].list['tokenizer']['path']}, {dirs[0]} used "
                             f"{first['tokenizer']['path']}")
    counts = {t: int(b - a) for t, (a, b) in offsets.items()}
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"no {split!r} items of task {', '.join(empty)} in the given sources: "
                         + "; ".join(_what_sources_hold(sources, sets, empty, split)))
    weights = _weights(counts, ratio, temperature)
    length = int(max(np.ceil(counts[t] / weights[t]) for t in counts))
    base = os.path.dirname(os.path.abspath(out))
    os.makedirs(base, exist_ok=True)
    index = write_index(os.path.splitext(os.path.abspath(out))[0] + ".index", arrays)
    index["task_offsets"] = {t: list(v) for t, v in offsets.items()}
    mix = {
        "version": MIX_VERSION,
        "seed": seed,
        "split": split,
        "mode": "ratio" if ratio is not None else "temperature",
        "temperature": temperature,
        "weights": weights,
        "counts": counts,
        "max_items_per_task": max_items,
        "length": length,
        "dirs": [os.path.relpath(d, base) for d in dirs],  # relative to mix.json: a moved data root reads
        "sources": [{"task": t, "dir": os.path.relpath(os.path.abspath(d), base)} for t, d in sources],
        "codec": first["codec"],
        "tokenizer": os.path.relpath(first["tokenizer"]["path"], base),
        "tokenizer_sha256": first["tokenizer"].get("sha256"),
        "upsampling": {t: round(weights[t] * length / counts[t], 3) for t in counts},
        "index": index,
    }
    write_json_atomic(out, mix)
    return mix


class MixtureReader:
    """reader[i] -> {"id", "task", "text_ids" int64 [L], "codes" int64 [K, T]} for any i >= 0.

    Memory: the memory-mapped index (shared by the ranks of a node), at most `max_open_shards` open shards
    (one file descriptor and their small index files each) and the current per-task permutation (4 bytes
    per item of that task). mix.json files of version 1 (no index file) get their index built in memory."""

    def __init__(self, mix_json: str, max_open_shards: int = 64):
        with open(mix_json, encoding="utf-8") as f:
            self.mix = json.load(f)
        self.path = os.path.abspath(mix_json)
        base = os.path.dirname(self.path)
        self.seed = int(self.mix["seed"])
        self.codec_info = self.mix["codec"]
        from data_prep.codec import check_codec_info  # torch: only where a reader is built

        check_codec_info(self.codec_info, mix_json)
        self.tokenizer_path = os.path.normpath(os.path.join(base, self.mix["tokenizer"]))
        self.tokenizer_sha256 = self.mix.get("tokenizer_sha256")
        self.tasks = sorted(self.mix["counts"])
        self.weights = self.mix["weights"]
        self.max_open_shards = max_open_shards
        if self.mix.get("version", 1) >= 2:
            self.dirs = [os.path.normpath(os.path.join(base, d)) for d in self.mix["dirs"]]
            self._offsets = {t: tuple(v) for t, v in self.mix["index"]["task_offsets"].items()}
            self._index_path = os.path.join(base, self.mix["index"]["file"])
            self._arrays = None  # memory-mapped on first use (and again after unpickling)
        else:
            sources = [(src["task"], src["dir"]) for src in self.mix["sources"]]
            self._arrays, self._offsets, self.dirs, _ = build_arrays(
                sources, self.mix["split"], self.tasks, self.seed, self.mix.get("max_items_per_task"))
        for t in self.tasks:
            a, b = self._offsets[t]
            if b - a != self.mix["counts"][t]:
                raise ValueError(
                    f"{mix_json}: {t} has {b - a} items, mix.json says {self.mix['counts'][t]}; the shards "
                    "changed since `unimoe data mix`: rerun it"
                )
        w = Fraction(self.weights[self.tasks[0]]).limit_denominator(MAX_DENOMINATOR)
        self._num, self._den = w.numerator, w.denominator
        self._perms: OrderedDict = OrderedDict()
        self.shards = ShardCache(max_open_shards)

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = open_index(self._index_path, self.mix["index"])
        return self._arrays

    def __len__(self) -> int:
        return int(self.mix["length"])

    @property
    def num_codebooks(self) -> int:
        return int(self.codec_info["num_codebooks"])

    def _count_first(self, i: int) -> int:
        """How many of indices [0, i) belong to the first task."""
        return (i * self._num + self._den // 2) // self._den

    def _locate(self, i: int) -> tuple[str, int, int]:
        """(task, task index, k-th sample of that task) of global index i."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        if len(self.tasks) == 1:
            return self.tasks[0], 0, i
        c0, c1 = self._count_first(i), self._count_first(i + 1)
        return (self.tasks[0], 0, c0) if c1 > c0 else (self.tasks[1], 1, i - c0)

    def task_of(self, i: int) -> str:
        return self._locate(i)[0]

    def _perm(self, t_idx: int, epoch: int, n: int) -> np.ndarray:
        key = (t_idx, epoch)
        if key not in self._perms:
            perm = np.random.default_rng([self.seed, t_idx, epoch]).permutation(n)
            self._perms[key] = perm.astype(np.uint32) if n < 2**32 else perm
            if len(self._perms) > 2 * len(self.tasks):  # the current and the next epoch of each task
                self._perms.popitem(last=False)
        return self._perms[key]

    def item_of(self, i: int) -> tuple[str, int]:
        """(task, row of the index arrays) of global sample index i."""
        task, t_idx, k = self._locate(int(i))
        first, stop = self._offsets[task]
        epoch, pos = divmod(k, stop - first)
        return task, first + int(self._perm(t_idx, epoch, stop - first)[pos])

    def lengths(self, i: int) -> tuple[int, int]:
        """(text ids, codec frames) of sample i, from the index alone (no shard is opened)."""
        g = self.item_of(i)[1]
        return int(self.arrays["item_text"][g]), int(self.arrays["item_frames"][g])

    def _open(self, t: int) -> OpenShard:
        return self.shards.get(t, lambda: self._open_new(t))

    def _open_new(self, t: int) -> OpenShard:
        """Row t of the shard table, opened and checked (on a cache miss only)."""
        arrays = self.arrays
        name = shard_name(int(arrays["shard_index"][t]))
        prefix = os.path.join(self.dirs[int(arrays["shard_dir"][t])], name)
        return OpenShard(prefix, self.num_codebooks, shard_expect(arrays, t, name))

    def __getitem__(self, i: int) -> dict:
        task, g = self.item_of(i)
        arrays = self.arrays
        shard = self._open(int(arrays["item_shard"][g]))
        row = int(arrays["item_row"][g])
        codes, text_ids = shard.get(row)
        return {"id": shard.item_id(int(arrays["item_meta"][g])), "task": task, "text_ids": text_ids,
                "codes": codes}

    def meta(self, i: int) -> dict:
        """Sample i's line of its shard's meta.jsonl (id, task, text, seconds, ...)."""
        g = self.item_of(i)[1]
        shard = self._open(int(self.arrays["item_shard"][g]))
        return shard.item_meta(int(self.arrays["item_meta"][g]))

    def close(self) -> None:
        self.shards.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"] = OrderedDict()
        state["shards"] = ShardCache(self.max_open_shards)
        if self.mix.get("version", 1) >= 2:
            state["_arrays"] = None  # the copy maps the file itself
        return state


def _parse_pairs(text: str, what: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        try:
            out[key.strip()] = float(val)
        except ValueError:
            raise ValueError(f"{what} must look like speech=1,music=1; got {text!r}") from None
        if not sep:
            raise ValueError(f"{what} must look like speech=1,music=1; got {text!r}")
    return out


def run_cli(args) -> int:
    try:
        sources = []
        for s in args.source:
            task, sep, d = s.partition("=")
            if not sep or not d:
                raise ValueError(f"--source must look like speech=DIR, got {s!r}")
            sources.append((task.strip(), d))
        ratio = _parse_pairs(args.ratio, "--ratio") if args.ratio else None
        mix = build_mix(
            sources,
            args.out,
            ratio=ratio,
            temperature=args.temperature,
            seed=args.seed,
            split=getattr(args, "split", "train"),
            max_items=getattr(args, "max_items", None),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    desc = ", ".join(
        f"{t}: {mix['counts'][t]} items, weight {mix['weights'][t]:.3f}, x{mix['upsampling'][t]} per epoch"
        for t in mix["counts"]
    )
    print(f"[mix] {args.out}: {mix['split']} split, epoch of {mix['length']} samples ({desc})")
    items = sum(mix["counts"].values())
    print(f"[mix] index {mix['index']['file']}: {mix['index']['bytes']} bytes "
          f"({mix['index']['bytes'] / items:.1f} per item)")
    if not mix["codec"].get("trained", True):
        print("[mix] note: the shards were made with the UNTRAINED random codec (tests/demo only)")
    return 0
