"""Resuming a run from a complete, intact checkpoint, at the layout it was saved at or at another one.

    client = resume(engine, pg, tag_dir, layout)     # this rank's client state (step, data position, RNG)

- Saved at this layout (world size, TP, EP, DP, ZeRO stage, precision): DeepSpeed's own
  `load_checkpoint`; each rank reads its ZeRO partition file, the module file and its own experts' files.
- Saved at another layout (another TP, EP or DP size, ZeRO 0/1/2 stage or precision), or written by
  `unimoe ckpt reshard`: resharded on load. Every rank reads by parameter name (reader.py) only what it
  holds: its module weights (its TP shard, its experts) and its ZeRO fragments of the fp32 master weights
  and AdamW moments; a tensor whose TP split changes is joined from the saved shards and split again.
  Its client state is that of the saved rank with the same TP and DP index (client.client_for_layout).
  ZeRO-3 checkpoints resume at their own layout only (their optimizer state is not readable by name).
"""

from __future__ import annotations

import os

import torch

from training.checkpoint import deepspeed_io
from training.checkpoint.client import client_for_layout, client_path, load_client
from training.checkpoint.manifest import CheckpointError, read_meta, verify
from training.checkpoint.reader import OPTIMIZER_KINDS, DeepSpeedSource, ReshardedSource, Source
from training.config import ConfigError

LAYOUT_KEYS = ("world_size", "tp", "ep", "dp", "zero_stage", "precision")


def describe_layout(lay: dict) -> str:
    return (f"tp={lay.get('tp')} ep={lay.get('ep')} dp={lay.get('dp')} (world {lay.get('world_size')}, "
            f"ZeRO {lay.get('zero_stage')}, {lay.get('precision')})")


def resume(engine, pg, tag_dir: str, layout: dict) -> dict:
    """Loads the training state into `engine`; returns this rank's client state, with "resharded_from"
    (the saved layout) when it was resharded on load, else None."""
    verify(tag_dir)
    saved = read_meta(tag_dir)["layout"]
    resharded = os.path.isdir(os.path.join(tag_dir, "resharded"))
    if not resharded and all(saved.get(k) == layout.get(k) for k in LAYOUT_KEYS):
        deepspeed_io.install(engine)
        ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
        path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed found no model state files to load")
        client = load_client(client_path(tag_dir, pg.env.rank))
        client["resharded_from"] = None
        return client
    src = ReshardedSource(tag_dir) if resharded else DeepSpeedSource(tag_dir)
    if isinstance(src, DeepSpeedSource) and src.zero3:
        raise ConfigError(f"{tag_dir} was saved with ZeRO stage 3 at {describe_layout(saved)}; this run is "
                          f"{describe_layout(layout)}. ZeRO-3 checkpoints resume at their own layout only")
    load_resharded(engine, pg, src)
    client = client_for_layout(tag_dir, saved, layout, pg.env.rank)
    client["resharded_from"] = saved
    return client


def _init_zero_optimizer_state(zopt, adam_step: int) -> None:
    """Create AdamW state on ZeRO's flat fp32 partitions (as after a step) and link DeepSpeed's views."""
    for flat in zopt.single_partition_of_fp32_groups:
        zopt.optimizer.state[flat] = {"step": torch.tensor(float(adam_step)),
                                      "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    zopt._hp_optimizer_states_linked = False
    zopt._lazy_init_hp_params_optimizer_state()


def load_resharded(engine, pg, src: Source) -> None:
    """Weights and AdamW state by parameter name into an engine with ZeRO 0, 1 or 2 (any TP/EP/DP layout).
    Reads the module weights of this rank and, for the optimizer, only the fragments of the flat partitions
    this rank owns, each straight into its destination."""
    zopt = engine.optimizer if hasattr(engine.optimizer, "single_partition_of_fp32_groups") else None
    stage = engine.zero_optimization_stage()
    if zopt is None and stage != 0:
        raise ConfigError(f"{src.where}: a resharded checkpoint loads into ZeRO stage 0, 1 or 2 "
                          f"(parallel.zero_stage={stage})")
    step = src.adam_step()
    if zopt is not None:
        _init_zero_optimizer_state(zopt, step)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            shape = src.shard_shape(name, pg.tp_rank, pg.tp)
            if shape != tuple(p.shape):
                raise CheckpointError(f"{src.where}: {name} has shape {shape}, this run's model wants "
                                      f"{tuple(p.shape)} (another model config or TP size)")
            direct = p.dtype == torch.float32 and p.data.is_contiguous()
            if direct:
                src.read_for(name, "weight", pg.tp_rank, pg.tp, out=p.data)
            else:
                p.data.copy_(src.read_for(name, "weight", pg.tp_rank, pg.tp).to(p.dtype))
            mapping = getattr(p, "_hp_mapping", None)
            if zopt is not None and mapping is not None:
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                flat = zopt.single_partition_of_fp32_groups[mapping.param_group_index]
                fragment = (lp.start, lp.numel)
                master = flat.narrow(0, hp.start, hp.numel)
                if direct:  # p.data holds the stored fp32 shard, read straight into it: copy its fragment
                    master.copy_(p.data.view(-1).narrow(0, *fragment))
                else:
                    src.read_for(name, "weight", pg.tp_rank, pg.tp, fragment, out=master)
                for kind in OPTIMIZER_KINDS:
                    if src.has_optimizer_state(name):
                        src.read_for(name, kind, pg.tp_rank, pg.tp, fragment,
                                     out=zopt.optimizer.state[flat][kind].narrow(0, hp.start, hp.numel))
            elif zopt is None and src.has_optimizer_state(name):  # ZeRO 0: the torch optimizer's own state
                base = getattr(engine.optimizer, "optimizer", engine.optimizer)
                base.state[p] = {"step": torch.tensor(float(step)), **{
                    k: src.read_for(name, k, pg.tp_rank, pg.tp).to(p.dtype) for k in OPTIMIZER_KINDS}}
