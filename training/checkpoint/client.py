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
    """This rank's RNG states. CUDA: only the device this rank uses ({"device", "count", "state"}), so a
    node with another number of GPUs (or per-task GPU binding) restores it onto the device the rank uses
    there."""
    cuda = None
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        cuda = {"device": dev, "count": torch.cuda.device_count(), "state": torch.cuda.get_rng_state(dev)}
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Restores what rng_state saved; the CUDA state goes to the device this rank uses now. A warning (and
    the CUDA generator left as seeded) when that cannot be exact: saved with GPUs and resumed without, or an
    older checkpoint holding every device's state from a node with another GPU count."""
    import warnings

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    saved = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda["state"]]
    if not torch.cuda.is_available():
        warnings.warn(f"checkpoint holds the CUDA RNG state of {len(saved)} GPU(s) but no GPU is visible: "
                      "not restored (CUDA random draws differ from an uninterrupted run)", RuntimeWarning,
                      stacklevel=2)
        return
    dev = torch.cuda.current_device()
    if isinstance(cuda, dict):  # this rank's own device state
        torch.cuda.set_rng_state(cuda["state"], dev)
    elif len(saved) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved)
    else:  # every visible device of the saving node, which had another GPU count
        src = min(dev, len(saved) - 1)
        torch.cuda.set_rng_state(saved[src], dev)
        warnings.warn(f"checkpoint holds the CUDA RNG states of {len(saved)} GPU(s), this node has "
                      f"{torch.cuda.device_count()}: device {dev} got saved state {src}; not exact",
                      RuntimeWarning, stacklevel=2)


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


def layout_dp(layout: dict) -> int:
    """A layout's data-parallel size (meta files that predate the "dp" key: world size / TP)."""
    return layout.get("dp", layout["world_size"] // layout["tp"])


def client_for_layout(tag_dir: str, saved: dict, layout: dict, rank: int) -> dict:
    """The client state rank `rank` of `layout` continues from, in a tag saved at layout `saved`: that of
    the source rank with the same TP and DP index (megatron order: TP ranks adjacent; a TP rank beyond
    the saved TP size takes the last one). A data-parallel rank that did not exist gets rng None (re-seeded
    at resume); step, data position and counters are the same on every rank."""
    d, t = divmod(rank, layout["tp"])
    src_dp = layout_dp(saved)
    source = d * saved["tp"] + min(t, saved["tp"] - 1) if d < src_dp else 0
    client = load_client(client_path(tag_dir, source))
    if d >= src_dp:
        client["rng"] = None
    return client
