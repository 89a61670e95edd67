"""Our per-rank client state (step, data position, RNG states, counters): TAG/client/rank{r:05d}.pt.

Written with torch.save and read with `torch.load(weights_only=True)`: tensors, python containers and
numbers, plus the numpy types of numpy's RNG state (allow-listed below). A file whose unpickling would
construct anything else, or run code, is refused.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from training.checkpoint.torch_files import load_weights_only


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def client_path(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, "client", f"rank{rank:05d}.pt")


def save_client(tag_dir: str, rank: int, state: dict) -> str:
    """Write and fsync this rank's client file; returns its path."""
    path = client_path(tag_dir, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_client(path: str) -> dict:
    return load_weights_only(path, _numpy_rng_globals())
