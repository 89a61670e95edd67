"""Distributed batches from a MixtureReader, resumable to the exact sample.

The mixture is an infinite, deterministic sequence of samples (reader[i] for any i >= 0). The state is
just `position` (the next global index).

Fixed-count batches (default): optimizer step s consumes global indices [position, position +
global_batch); data-parallel rank r takes the contiguous block r * per_rank ... and splits it into
micro-batches, so a resume on another data-parallel size continues with the same samples.

Token-budget batches (`data.batch_tokens`): every micro-batch holds as many samples as fit in
batch_tokens padded positions (samples x longest sequence), grouped by length. A step needs
M = dp x grad_accum micro-batches; it looks at the lengths of the next `data.batch_window` samples (from
the mixture index, no shard read), and consumes the longest prefix [position, position + n) whose
samples, sorted by length and packed greedily, fill at most M micro-batches (more samples never need
fewer micro-batches, so n is found by bisection). Micro-batch b (in length order) goes to rank b mod dp.
The step is a pure function of position, so resuming needs nothing else; each step keeps the mixture's
order and task ratio (a contiguous run of it), only the grouping changes.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch


def resolve_train_mix(data_cfg) -> str:
    """The mix.json to read: data.train, or the mixture `data.demo_mix` of the built-in corpus
    `data.builtin` (built on first use)."""
    if data_cfg.train is not None:
        return data_cfg.train
    return _demo_mix(data_cfg.builtin, "demo_mix", data_cfg.demo_mix)


def resolve_valid_mix(data_cfg) -> str | None:
    """The validation mix.json: data.valid, or with a built-in corpus its mixture `data.demo_valid_mix`."""
    if data_cfg.valid is not None or data_cfg.train is not None or data_cfg.demo_valid_mix is None:
        return data_cfg.valid
    return _demo_mix(data_cfg.builtin, "demo_valid_mix", data_cfg.demo_valid_mix)


def _demo_mix(builtin: str, field: str, key: str) -> str:
    """The path of the built-in corpus's mixture `key` (the corpus is built on first use)."""
    from data_prep.demo import BUILTIN
    paths = BUILTIN[builtin]()
    if key not in paths:
        from training.config import ConfigError
        raise ConfigError(f"data.{field}={key!r} is not a demo mixture; "
                          f"choose one of {sorted(k for k, v in paths.items() if str(v).endswith('.json'))}")
    return str(paths[key])


def open_reader(data_cfg, mix_path: str):
    from data_prep.mix import MixtureReader
    return MixtureReader(mix_path, max_open_shards=data_cfg.max_open_shards)


def sequence_length(text_ids: int, frames: int, model_cfg) -> int:
    """Positions of one sample in a collated batch: <task> text <sep>, then the delayed frames but one
    (training.model.batch.collate)."""
    return text_ids + 2 + model_cfg.delays().delayed_length(frames) - 1


def pack_sorted(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Indices of `lengths` sorted by length (stable), cut greedily into groups whose padded size
    count x longest stays within budget (a sample longer than the budget is a group of its own)."""
    order = np.argsort(lengths, kind="stable")
    groups, first = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or (k - first + 1) * int(lengths[order[k]]) > budget:
            groups.append(order[first:k])
            first = k
    return groups


def split_to(groups: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Split the largest groups in halves until there are `count` of them (all non-empty), in length order."""
    groups = list(groups)
    while len(groups) < count:
        big = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
        if len(groups[big]) < 2:
            raise ValueError(f"cannot make {count} micro-batches from {sum(map(len, groups))} samples")
        half = len(groups[big]) // 2
        groups[big: big + 1] = [groups[big][:half], groups[big][half:]]
    return groups


def plan_token_step(lengths: np.ndarray, budget: int, micro_batches: int) -> tuple[int, list[np.ndarray]]:
    """(n, groups): the longest prefix n of `lengths` that packs into at most `micro_batches` groups within
    the budget, and exactly `micro_batches` groups of indices into it."""
    if len(lengths) < micro_batches:
        raise ValueError(f"data.batch_window={len(lengths)} must be >= the micro-batches per step "
                         f"{micro_batches}")
    lo, hi = micro_batches, len(lengths)  # lo always fits: one sample per micro-batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(pack_sorted(lengths[:mid], budget)) <= micro_batches:
            lo = mid
        else:
            hi = mid - 1
    return lo, split_to(pack_sorted(lengths[:lo], budget), micro_batches)


TOKEN_KEY_POSITIONS = 1 << 24  # positions per sample in a token key (model.max_seq_len is far below)


def token_keys(indices: list[int], length: int) -> torch.Tensor:
    """int64 [B, L]: global sample index * 2**24 + position, the key of each token's router jitter
    (moe.layer.MoELayer): the same whichever rank, micro-batch or padding the sample gets."""
    return (torch.tensor(indices, dtype=torch.int64)[:, None] * TOKEN_KEY_POSITIONS
            + torch.arange(length, dtype=torch.int64)[None, :])


def padding_fraction(batches: list[dict]) -> float:
    """Share of the collated positions that are padding, over a rank's micro-batches of one step."""
    valid = sum(int(b["valid"].sum()) for b in batches)
    total = sum(b["valid"].numel() for b in batches)
    return 1.0 - valid / total if total else 0.0


class DistributedBatches:
    def __init__(self, reader, model_cfg, global_batch: int, micro_batch: int, dp_rank: int, dp: int,
                 cond_drop_prob: float = 0.0, seed: int = 0, position: int = 0,
                 batch_tokens: int | None = None, batch_window: int = 2048):
        assert global_batch % (dp * micro_batch) == 0, "validated in TrainConfig.validate"
        self.reader, self.model_cfg = reader, model_cfg
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp = dp_rank, dp
        self.cond_drop_prob, self.seed = cond_drop_prob, seed
        self.position = position
        self.batch_tokens, self.batch_window = batch_tokens, batch_window

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def next_step(self) -> list[dict]:
        """The micro-batches (collated) of this rank for the next optimizer step; advances the position."""
        batches, self.position = self.step_at(self.position)
        return batches

    def batches_at(self, position: int) -> list[dict]:
        return self.step_at(position)[0]

    def step_at(self, position: int) -> tuple[list[dict], int]:
        """(this rank's collated micro-batches, the position after the step) of the step at `position`."""
        groups, end = self.plan(position)
        return [self._collate([position + int(i) for i in g]) for g in groups], end

    def plan(self, position: int) -> tuple[list[np.ndarray], int]:
        """(this rank's micro-batches as offsets from position, the position after the step)."""
        if self.batch_tokens is None:
            per_rank = self.global_batch // self.dp
            start = self.dp_rank * per_rank
            groups = [np.arange(start + m * self.micro_batch, start + (m + 1) * self.micro_batch)
                      for m in range(self.grad_accum)]
            return groups, position + self.global_batch
        extra = sequence_length(0, 0, self.model_cfg)  # the sequence length is text + frames + extra
        lengths = np.array([sum(self.reader.lengths(i)) + extra
                            for i in range(position, position + self.batch_window)])
        n, groups = plan_token_step(lengths, self.batch_tokens, self.dp * self.grad_accum)
        return groups[self.dp_rank:: self.dp], position + n

    def _collate(self, indices: list[int]) -> dict:
        from training.model.batch import collate

        samples = [self.reader[i] for i in indices]
        # the cond-drop draw depends on the first sample's global index only (layout independent)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + indices[0])
        batch = collate(samples, self.model_cfg, cond_drop_prob=self.cond_drop_prob, generator=gen)
        batch["token_keys"] = token_keys(indices, batch["text"].shape[1])
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "global_batch": self.global_batch,
                "batch_tokens": self.batch_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class Prefetcher:
    """Reads and collates the next `depth` steps in a background thread while the current one trains.
    The state stays that of DistributedBatches: its position moves only when a step is taken."""

    def __init__(self, batches: DistributedBatches, depth: int = 2, pin: bool = False):
        self.batches = batches
        self.pin = pin  # page-locked host batches (GPU training): their copies to the device are asynchronous
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(batches.position,), daemon=True)
        self._thread.start()

    def _work(self, position: int) -> None:
        while not self._stop.is_set():
            try:
                batches, after = self.batches.step_at(position)
                if self.pin:
                    batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in mb.items()}
                               for mb in batches]
                item = (position, (batches, after), None)
            except Exception as e:  # handed to the training loop, raised there
                item = (position, None, e)
            while not self._stop.is_set():
                try:
                    self.queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            position = after

    def next_step(self) -> list[dict]:
        position, step, error = self.queue.get()
        if error is not None:
            raise error
        assert position == self.batches.position, "prefetcher out of step with the data position"
        batches, self.batches.position = step
        return batches

    def close(self) -> None:
        """Stop the thread and wait for it (a step being read finishes): a daemon thread still inside torch
        when the process exits can abort it ("terminate called without an active exception")."""
        self._stop.set()
        self._thread.join(timeout=30)
