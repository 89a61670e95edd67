"""DeepSpeed's torch checkpoint engine, writing durably: each file is fsynced before `save` returns and the
paths are recorded, so a rank knows which files it wrote and that they are on disk.

    writer = install(engine)        # once per engine; DeepSpeed keeps writing its own files and formats
    writer.written.clear(); engine.save_checkpoint(...); writer.written   # this rank's files

Loads are DeepSpeed's, except that the module files (*model_states.pt) are memory-mapped: DeepSpeed
copies their tensors into the model and drops them, so their pages leave with the mapping instead of
staying in the heap (measured with benchmarks/bench_ckpt.py). Optimizer files are read as DeepSpeed
does: it keeps their AdamW moments as the optimizer's state, which must not stay backed by a file that
retention may delete.
"""

from __future__ import annotations

import os

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class SyncedCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, zipfile_serialization: bool = True):
        super().__init__(config_params=None)
        self.zipfile_serialization = zipfile_serialization
        self.written: list[str] = []

    def save(self, state_dict, path: str):
        with open(path, "wb") as f:
            torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
            f.flush()
            os.fsync(f.fileno())
        self.written.append(path)

    def load(self, path: str, map_location=None):
        mmap = path.endswith("model_states.pt")
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)


def install(engine) -> SyncedCheckpointEngine:
    current = engine.checkpoint_engine
    if isinstance(current, SyncedCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"checkpoint engine {type(current).__name__}: unimoe's atomic checkpoints need "
                         "DeepSpeed's default torch checkpoint engine (remove the nebula / decoupled "
                         "checkpoint settings from the ds_config)")
    engine.checkpoint_engine = SyncedCheckpointEngine(current.zipfile_serialization)
    return engine.checkpoint_engine
