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
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from fractions import Fraction

import numpy as np

from data_prep.manifest import TASKS
from data_prep.shards import ShardSet, write_json_atomic

MAX_DENOMINATOR = 1_000_000


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


def build_mix(
    sources: list[tuple[str, str]],
    out: str,
    ratio: dict[str, float] | None = None,
    temperature: float | None = None,
    seed: int = 0,
    split: str = "train",
    max_items: int | None = None,
) -> dict:
    """Write mix.json for sources [(task, prep_dir)]; returns its content."""
    if not sources:
        raise ValueError("no --source given")
    counts: dict[str, int] = {}
    codec = tokenizer = None
    recs = []
    for task, d in sources:
        if task not in TASKS:
            raise ValueError(f"--source {task}={d}: task must be one of {', '.join(TASKS)}")
        ss = ShardSet(d)
        n = sum(1 for rows in ss.meta for r in rows if r["task"] == task and r["split"] == split)
        if codec is None:
            codec, tokenizer = ss.list["codec"], ss.list["tokenizer"]["path"]
        elif ss.list["codec"].get("fingerprint") != codec.get("fingerprint"):
            raise ValueError(f"{d} was encoded with another codec than {recs[0]['dir']}")
        elif ss.list["tokenizer"]["path"] != tokenizer:
            raise ValueError(
                f"{d} used tokenizer {ss.list['tokenizer']['path']}, {recs[0]['dir']} used {tokenizer}"
            )
        recs.append({"task": task, "dir": ss.out_dir, "items": n})
        counts[task] = counts.get(task, 0) + n
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"no {split!r} items of task {', '.join(empty)} in the given sources")
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"--max-items must be >= 1, got {max_items}")
        counts = {t: min(n, max_items) for t, n in counts.items()}
    weights = _weights(counts, ratio, temperature)
    length = int(max(np.ceil(counts[t] / weights[t]) for t in counts))
    mix = {
        "version": 1,
        "seed": seed,
        "split": split,
        "mode": "ratio" if ratio is not None else "temperature",
        "temperature": temperature,
        "weights": weights,
        "counts": counts,
        "max_items_per_task": max_items,
        "length": length,
        "sources": recs,
        "codec": codec,
        "tokenizer": tokenizer,
        "upsampling": {t: round(weights[t] * length / counts[t], 3) for t in counts},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, mix)
    return mix


class MixtureReader:
    """reader[i] -> {"id", "task", "text_ids" int64 [L], "codes" int64 [K, T]} for any i >= 0."""

    def __init__(self, mix_json: str):
        with open(mix_json, encoding="utf-8") as f:
            self.mix = json.load(f)
        self.path = os.path.abspath(mix_json)
        self.seed = int(self.mix["seed"])
        self.codec_info = self.mix["codec"]
        from data_prep.codec import check_codec_info  # torch: only where a reader is built

        check_codec_info(self.codec_info, mix_json)
        self.tokenizer_path = self.mix["tokenizer"]
        self.tasks = sorted(self.mix["counts"])
        self.weights = self.mix["weights"]
        self._sets: list[ShardSet] = []
        self._items: dict[str, list[tuple[int, int, int]]] = {t: [] for t in self.tasks}  # (set, shard, row)
        for src in self.mix["sources"]:
            ss = ShardSet(src["dir"])
            s_idx = len(self._sets)
            self._sets.append(ss)
            for sh_i, rows in enumerate(ss.meta):
                for j, r in enumerate(rows):
                    if r["task"] == src["task"] and r["split"] == self.mix["split"]:
                        self._items[src["task"]].append((s_idx, sh_i, j))
        limit = self.mix.get("max_items_per_task")
        for t_idx, t in enumerate(self.tasks):
            items = self._items[t]
            if limit is not None and len(items) > limit:
                keep = np.sort(
                    np.random.default_rng([self.seed, t_idx, 1 << 30]).permutation(len(items))[:limit]
                )
                self._items[t] = [items[k] for k in keep]
            if len(self._items[t]) != self.mix["counts"][t]:
                raise ValueError(
                    f"{mix_json}: {t} has {len(self._items[t])} items, mix.json says "
                    f"{self.mix['counts'][t]}; the shards changed since `unimoe data mix`: rerun it"
                )
        w = Fraction(self.weights[self.tasks[0]]).limit_denominator(MAX_DENOMINATOR)
        self._num, self._den = w.numerator, w.denominator
        self._perms: OrderedDict = OrderedDict()

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
            self._perms[key] = np.random.default_rng([self.seed, t_idx, epoch]).permutation(n)
            if len(self._perms) > 8:
                self._perms.popitem(last=False)
        return self._perms[key]

    def __getitem__(self, i: int) -> dict:
        task, t_idx, k = self._locate(int(i))
        items = self._items[task]
        epoch, pos = divmod(k, len(items))
        s, shard, row = items[self._perm(t_idx, epoch, len(items))[pos]]
        codes, text_ids = self._sets[s].get(shard, row)
        return {
            "id": self._sets[s].meta[shard][row]["id"],
            "task": task,
            "text_ids": text_ids,
            "codes": codes,
        }

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"] = OrderedDict()
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
    if not mix["codec"].get("trained", True):
        print("[mix] note: the shards were made with the UNTRAINED random codec (tests/demo only)")
    return 0
