"""Distributed batches from a MixtureReader, resumable to the exact sample.

The mixture is an infinite, deterministic sequence of samples (reader[i] for any i >= 0). Optimizer step s
consumes global indices [position, position + global_batch); data-parallel rank r takes the contiguous
block r * per_rank ... and splits it into micro-batches. The state is just `position` (the next global
index), so a resume on another data-parallel size continues with the same samples.
"""

from __future__ import annotations

import queue
import threading

import torch


def resolve_train_mix(data_cfg) -> str:
    """The mix.json to read: data.train, or the built-in demo corpus's mixture `data.demo_mix`."""
    if data_cfg.train is not None:
        return data_cfg.train
    from data_prep.demo import ensure_demo_data
    paths = ensure_demo_data()
    if data_cfg.demo_mix not in paths:
        from training.config import ConfigError
        raise ConfigError(f"data.demo_mix={data_cfg.demo_mix!r} is not a demo mixture; "
                          f"choose one of {sorted(k for k, v in paths.items() if str(v).endswith('.json'))}")
    return str(paths[data_cfg.demo_mix])


class DistributedBatches:
    def __init__(self, reader, model_cfg, global_batch: int, micro_batch: int, dp_rank: int, dp: int,
                 cond_drop_prob: float = 0.0, seed: int = 0, position: int = 0):
        assert global_batch % (dp * micro_batch) == 0, "validated in TrainConfig.validate"
        self.reader, self.model_cfg = reader, model_cfg
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp = dp_rank, dp
        self.cond_drop_prob, self.seed = cond_drop_prob, seed
        self.position = position

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def next_step(self) -> list[dict]:
        """The micro-batches (collated) of this rank for the next optimizer step; advances the position."""
        batches = self.batches_at(self.position)
        self.position += self.global_batch
        return batches

    def batches_at(self, position: int) -> list[dict]:
        from training.model.batch import collate

        per_rank = self.global_batch // self.dp
        start = position + self.dp_rank * per_rank
        batches = []
        for m in range(self.grad_accum):
            first = start + m * self.micro_batch
            samples = [self.reader[i] for i in range(first, first + self.micro_batch)]
            # the cond-drop draw depends on the first sample's global index only (layout independent)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + first)
            batches.append(collate(samples, self.model_cfg, cond_drop_prob=self.cond_drop_prob,
                                   generator=gen))
        return batches

    def state_dict(self) -> dict:
        return {"position": self.position, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class Prefetcher:
    """Reads and collates the next `depth` steps in a background thread while the current one trains.
    The state stays that of DistributedBatches: its position moves only when a step is taken."""

    def __init__(self, batches: DistributedBatches, depth: int = 2):
        self.batches = batches
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(batches.position,), daemon=True)
        self._thread.start()

    def _work(self, position: int) -> None:
        while not self._stop.is_set():
            try:
                item = (position, self.batches.batches_at(position), None)
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
            position += self.batches.global_batch

    def next_step(self) -> list[dict]:
        position, batches, error = self.queue.get()
        if error is not None:
            raise error
        assert position == self.batches.position, "prefetcher out of step with the data position"
        self.batches.position += self.batches.global_batch
        return batches

    def close(self) -> None:
        self._stop.set()
