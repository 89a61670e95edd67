"""Saving across ranks: every rank writes its own files, all ranks agree, then rank 0 makes the tag visible.

    path = save(engine, pg, run_dir, step, client_state, meta, cfg.checkpoint)   # None: refused, no room

1. Room: every rank compares the free space under RUN/checkpoints with the checkpoint's expected size
   (the newest complete tag's, or an estimate from the engine); an all-reduce makes the refusal unanimous.
2. Write: DeepSpeed's own files (`engine.save_checkpoint`, each fsynced by deepspeed_io), then this rank's
   client file (client.py). Nothing else: DeepSpeed's files are the only copy of the training state.
3. Agree: an all-reduce (MIN) of a per-rank flag "my files are written and fsynced".
4. Rank 0: meta.json, COMPLETE (every file with its size, manifest.py), `latest`, retention.py's pruning;
   a barrier, so that every rank returns the path of a complete tag.

Error paths run no collective. A rank whose DeepSpeed write raises leaves with the exception; the others
fail in the collective they wait in (gloo reports the lost peer; the launcher or srun ends the rest) and
nobody writes COMPLETE, so `latest` keeps naming the previous complete tag. A failure after DeepSpeed's
part (the client file) is reported through the flag of step 3 and every rank raises OSError.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param

from training.checkpoint import deepspeed_io, retention
from training.checkpoint.client import save_client
from training.checkpoint.manifest import (
    CKPT_SUBDIR,
    complete_tags,
    fsync_dir,
    read_complete,
    tag_name,
    write_atomic,
    write_complete,
)


def _rank_estimate(engine, pg) -> float:
    """Bytes this rank's share of a checkpoint takes: module weights over their replicas + the ZeRO
    partition of fp32 master weights and two AdamW moments."""
    module = 0.0
    for p in engine.module.parameters():
        replicas = pg.dp // pg.ep if is_moe_param(p) else pg.dp
        module += getattr(p, "ds_numel", p.numel()) * p.element_size() / replicas
    flat = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
    if flat is not None:
        state = sum(t.numel() for t in flat)
    else:  # ZeRO 0 or 3: every trainable element once over the data-parallel group
        state = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) / pg.dp
    return module + 12.0 * state


def expected_bytes(engine, pg, ckpt_dir: str) -> int:
    """Collective. The checkpoint's size: the larger of the newest complete tag's and the estimate."""
    (estimate,) = pg.all_reduce([_rank_estimate(engine, pg)], dist.ReduceOp.SUM)
    tags = complete_tags(ckpt_dir)
    previous = sum((read_complete(tags[-1])["files"] or {}).values()) if tags else 0
    return int(max(estimate, previous))


def save(engine, pg, run_dir: str, step: int, client_state: dict, meta: dict, ckpt_cfg) -> str | None:
    """Collective (pg: training.cluster.parallel.ParallelGroups, whose all_reduce it uses). Writes tag
    step_<step>; returns its path once every rank's files are on disk and rank 0
    marked it complete, or None (on every rank) when the free space is below the expected size."""
    ckpt_dir = os.path.join(run_dir, CKPT_SUBDIR)
    tag = tag_name(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    rank = pg.env.rank
    os.makedirs(ckpt_dir, exist_ok=True)
    if pg.is_main and os.path.exists(tag_dir):
        shutil.rmtree(tag_dir)  # a stale or incomplete save of the same step
    need = expected_bytes(engine, pg, ckpt_dir)
    free = shutil.disk_usage(ckpt_dir).free
    # unanimous; it also orders rank 0's rmtree above before any rank writes
    (room,) = pg.all_reduce([1.0 if free >= need else 0.0], dist.ReduceOp.MIN)
    if room < 1:
        if free < need:
            print(f"[rank {rank}] checkpoint {tag} refused: {free / 2**20:.0f} MiB free under {ckpt_dir}, "
                  f"{need / 2**20:.0f} MiB expected; free disk space or lower checkpoint.keep_last",
                  file=sys.stderr, flush=True)
        return None

    writer = deepspeed_io.install(engine)
    writer.written.clear()
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    ok = 1.0
    try:
        save_client(tag_dir, rank, client_state)
        for d in {os.path.dirname(p) for p in writer.written} | {tag_dir, os.path.join(tag_dir, "client")}:
            fsync_dir(d)
    except OSError as e:
        print(f"[rank {rank}] error: writing checkpoint {tag} failed: {e}", file=sys.stderr, flush=True)
        ok = 0.0
    (agreed,) = pg.all_reduce([ok], dist.ReduceOp.MIN)
    if agreed < 1:
        raise OSError(f"{tag_dir}: a rank could not write its files; the checkpoint stays incomplete "
                      "(the previous complete one is still `latest`)")
    if pg.is_main:
        write_atomic(os.path.join(tag_dir, "meta.json"), json.dumps(meta, indent=1, default=str))
        write_complete(tag_dir, step)
        write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        retention.prune(ckpt_dir, ckpt_cfg.keep_last, ckpt_cfg.keep_every)
    if dist.is_initialized():
        dist.barrier()  # every rank returns once the tag is complete (and leaves save() together)
    return tag_dir
