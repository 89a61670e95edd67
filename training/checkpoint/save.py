"""Checkpoints: DeepSpeed ZeRO checkpoints + client state, atomic visibility, resume, export, reshard.

Run dir layout:
    RUN/checkpoints/latest                 name of the newest COMPLETE tag (written last, atomically)
    RUN/checkpoints/step_00000040/         one DeepSpeed tag:
        mp_rank_00_model_states.pt         DeepSpeed: module state dict (+ our client state of rank 0)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt / expp_rank_* / layer_*_expert_*   DeepSpeed's files
        client/rank{r}.pt                  per rank: step, data position, python/numpy/torch RNG, counters
        portable/tp{t}_rank{r}.pt          layout-independent weights + AdamW state by name (ckpt_portable)
        meta.json                          step, layout, run config, model config, codec info, tokenizer
        COMPLETE                           written by rank 0 after every rank finished: the tag is usable
A tag without COMPLETE (a crash or kill mid-save) is invisible to --resume auto and deleted later.

Resume at the saved layout uses DeepSpeed's load_checkpoint (exact); at another EP/DP layout (after
`unimoe ckpt reshard`, or a different number of processes) it loads the portable state (also exact for
weights and AdamW moments; the RNG of ranks that did not exist before is re-seeded).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

CKPT_SUBDIR = "checkpoints"
COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tag dirs, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.exists(os.path.join(ckpt_dir, t,
                                                                                                  COMPLETE))]
    return [os.path.join(ckpt_dir, t) for t in sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))]


def save(engine, pg, run_dir: str, step: int, client_state: dict, meta: dict, keep_last: int) -> str:
    """Collective. Writes tag step_<step>; returns its path once every rank finished and COMPLETE exists."""
    ckpt_dir = os.path.join(run_dir, CKPT_SUBDIR)
    tag = tag_name(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if pg.is_main and os.path.exists(tag_dir):
        shutil.rmtree(tag_dir)  # a stale or incomplete save of the same step
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    from training.checkpoint.portable import save_portable
    save_portable(engine, pg, tag_dir)
    os.makedirs(os.path.join(tag_dir, "client"), exist_ok=True)
    path = os.path.join(tag_dir, "client", f"rank{pg.env.rank:05d}.pt")
    torch.save(client_state, path + ".tmp")
    os.replace(path + ".tmp", path)
    _barrier()  # every rank's files are on disk before the tag becomes visible
    if pg.is_main:
        write_atomic(os.path.join(tag_dir, "meta.json"), json.dumps(meta, indent=1, default=str))
        write_atomic(os.path.join(tag_dir, COMPLETE), f"{step}\n")
        write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep_last)
    _barrier()
    return tag_dir


def prune(ckpt_dir: str, keep_last: int) -> None:
    complete = complete_tags(ckpt_dir)
    newest = int(TAG_RE.match(os.path.basename(complete[-1])).group(1)) if complete else -1
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for t in os.listdir(ckpt_dir):  # leftovers of interrupted saves older than the newest complete one
        m = TAG_RE.match(t)
        if m and int(m.group(1)) < newest and not os.path.exists(os.path.join(ckpt_dir, t, COMPLETE)):
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def find_checkpoint(path: str) -> str | None:
    """A run dir, its checkpoints/ dir or one tag dir -> the newest complete tag dir (None: nothing yet)."""
    if os.path.exists(os.path.join(path, COMPLETE)):
        return path
    for d in (os.path.join(path, CKPT_SUBDIR), path):
        tags = complete_tags(d)
        if tags:
            return tags[-1]
    return None


def read_meta(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, "meta.json")) as f:
        return json.load(f)


def resume(engine, pg, tag_dir: str, layout: dict) -> dict:
    """Collective. Loads the training state; returns this rank's client state (step, data, ...)."""
    meta = read_meta(tag_dir)
    saved = meta["layout"]
    same = all(saved.get(k) == layout.get(k) for k in ("world_size", "tp", "ep", "zero_stage"))
    has_ds_files = bool(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))  # ZeRO-3: zero_pp_*
    native = same and has_ds_files and (engine.has_moe_layers or layout["ep"] == 1)
    rank_file = os.path.join(tag_dir, "client", f"rank{pg.env.rank:05d}.pt")
    if native:
        ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
        engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    else:
        from training.checkpoint.portable import load_portable, read_portable
        if saved.get("tp") != layout["tp"]:
            raise ValueError(f"{tag_dir}: saved with tp={saved.get('tp')}, this run has tp={layout['tp']}; "
                             "changing the tensor-parallel size is not supported")
        load_portable(engine, read_portable(tag_dir, pg.tp_rank))
    if not os.path.exists(rank_file):  # a rank that did not exist in the saved layout
        rank_file = os.path.join(tag_dir, "client", "rank00000.pt")
        client = torch.load(rank_file, map_location="cpu", weights_only=False)
        client["rng"] = None
    else:
        client = torch.load(rank_file, map_location="cpu", weights_only=False)
    client["resumed_native"] = native
    _barrier()
    return client
