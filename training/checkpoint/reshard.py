"""`unimoe ckpt reshard --ckpt RUN [--tp T] [--ep E] [--dp D] --out NEW_RUN`: one checkpoint's training state
for another layout, converted offline by one process from DeepSpeed's own files (or an earlier reshard).

Every parameter's fp32 master weight and AdamW moments are read by name (reader.py: experts by global
index, TP shards joined) and written to NEW_RUN/checkpoints/<the same tag>/:
    resharded/tp{t}.safetensors   tensors that tensor parallelism splits: target TP rank t's shard, split
                                  along their parallel dimension (training.model.tensor_parallel rules)
    resharded/common.safetensors  everything else (experts, norms, gates ...), once
    client/rank{r:05d}.pt         per target rank: step, data position, RNG state of the source rank with
                                  the same TP and DP index (a rank that did not exist is re-seeded)
    meta.json, COMPLETE           the target layout, `resharded_from`, AdamW's step; the file manifest
EP and DP need no data movement here: DeepSpeed partitions the state when the resumed engine starts and
each rank then reads only its fragments (resume.py). Tensors are streamed: one at a time is in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from tqdm import tqdm

from training.checkpoint.client import client_for_layout, layout_dp, save_client
from training.checkpoint.manifest import CKPT_SUBDIR, CheckpointError, write_atomic, write_complete
from training.checkpoint.reader import KINDS, DeepSpeedSource, open_source
from training.checkpoint.safetensors_io import write_safetensors


def target_layout(src, tp: int | None, ep: int | None, dp: int | None) -> dict:
    """The source layout with the requested sizes; CheckpointError when the model or batch cannot take it."""
    from training.model.tensor_parallel import check_tp_size
    saved = src.meta["layout"]
    tp, ep = tp or saved["tp"], ep or saved["ep"]
    dp = dp or layout_dp(saved)
    moe = src.meta["config"].get("moe")
    problems = []
    if moe is None and ep != 1:
        problems.append("a dense model has no experts: use --ep 1")
    experts = (moe or {}).get("num_routed_experts", 8)
    if moe is not None and experts % ep:
        problems.append(f"--ep {ep} must divide the number of routed experts {experts}")
    if dp % ep:
        problems.append(f"--ep {ep} must divide the data-parallel size {dp} (set --dp)")
    global_batch = src.meta["config"]["data"]["global_batch_size"]
    if global_batch % dp:
        problems.append(f"--dp {dp} must divide data.global_batch_size {global_batch}")
    try:
        check_tp_size(src.cfg, tp)
    except ValueError as e:
        problems.append(f"--tp {tp}: {e}")
    if problems:
        raise CheckpointError("; ".join(problems))
    return {**saved, "tp": tp, "ep": ep, "dp": dp, "world_size": tp * dp}


def _plan(src, tp: int) -> dict[str, dict[str, tuple]]:
    """{file: {key "<kind>/<name>": (shape, dtype, name, kind, target TP rank or None)}} in write order:
    TP-split tensors one shard per tp{t} file, the rest once in common.safetensors."""
    from training.model.tensor_parallel import shard_kind
    files: dict[str, dict[str, tuple]] = {"common.safetensors": {}}
    files.update({f"tp{t}.safetensors": {} for t in range(tp)})
    for name, (shape, dtype) in src.shapes.items():
        split = shard_kind(name) is not None
        for kind in KINDS if src.has_optimizer_state(name) else KINDS[:1]:
            for t in range(tp) if split else [None]:
                target = files[f"tp{t}.safetensors" if split else "common.safetensors"]
                part = src.shard_shape(name, t, tp) if split else shape
                target[f"{kind}/{name}"] = (part, dtype, name, kind, t)
    return files


def _write_tensors(src, out_tag: str, tp: int) -> None:
    from training.model.tensor_parallel import shard_kind, shard_tensor
    files = _plan(src, tp)
    bar = tqdm(total=sum(len(v) for v in files.values()), desc="reshard", unit="tensor", file=sys.stderr)

    def produce(entry: tuple):
        _, _, name, kind, t = entry
        same_tp = t is not None and src.tp == tp  # rank t's shard is the source's rank t shard: read only it
        value = src.read_shard(name, kind, t) if same_tp else src.read(name, kind)
        if value is None:
            raise CheckpointError(f"{src.where}: no {kind} for {name}")
        bar.update()
        if t is None:
            return value
        return (value if same_tp else shard_tensor(value, shard_kind(name), src.cfg, t, tp)).contiguous()

    os.makedirs(os.path.join(out_tag, "resharded"))
    for fname, entries in files.items():
        specs = [(key, entry[0], entry[1]) for key, entry in entries.items()]
        write_safetensors(os.path.join(out_tag, "resharded", fname), specs,
                          lambda key, entries=entries: produce(entries[key]))
    bar.close()


def _write_clients(src, out_tag: str, layout: dict) -> None:
    for rank in range(layout["world_size"]):
        save_client(out_tag, rank, client_for_layout(src.where, src.meta["layout"], layout, rank))


def reshard(ckpt: str, out: str, tp: int | None = None, ep: int | None = None,
            dp: int | None = None) -> tuple[str, dict]:
    """-> (the new tag dir, its layout)."""
    if not os.path.exists(ckpt):  # (open_source's message would also suggest an export, which holds no state)
        raise CheckpointError(f"--ckpt {ckpt} does not exist (give a training run dir or one of its "
                              "checkpoints/step_* dirs)")
    src = open_source(ckpt)
    if isinstance(src, DeepSpeedSource) and src.zero_stage not in (1, 2):
        raise CheckpointError(f"{src.where}: resharding reads ZeRO stage 1/2 checkpoints (this one is ZeRO "
                              f"{src.zero_stage}); resume it at its own layout")
    if not os.path.isdir(src.where):
        raise CheckpointError(f"{ckpt}: an exported model holds weights only; reshard a run's checkpoint")
    layout = target_layout(src, tp, ep, dp)
    out_tag = os.path.join(out, CKPT_SUBDIR, os.path.basename(src.where.rstrip("/")))
    if os.path.abspath(out_tag) == os.path.abspath(src.where):
        raise CheckpointError(f"--out {out}: that is the checkpoint's own run dir; give a new one")
    if os.path.exists(out_tag):
        shutil.rmtree(out_tag)
    os.makedirs(out_tag)
    _write_tensors(src, out_tag, layout["tp"])
    _write_clients(src, out_tag, layout)
    meta = {**src.meta, "layout": layout, "adam_step": src.adam_step(),
            "resharded_from": {"checkpoint": os.path.abspath(src.where), "layout": src.meta["layout"]}}
    meta["config"]["parallel"].update(tp=layout["tp"], ep=layout["ep"])
    write_atomic(os.path.join(out_tag, "meta.json"), json.dumps(meta, indent=1, default=str))
    write_complete(out_tag, int(meta["step"]))
    write_atomic(os.path.join(out, CKPT_SUBDIR, "latest"), os.path.basename(out_tag))
    return out_tag, layout


def reshard_cli(args) -> int:
    try:
        out_tag, lay = reshard(args.ckpt, args.out, args.tp, args.ep, args.dp)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"resharded {args.ckpt} -> {out_tag} (tp={lay['tp']}, ep={lay['ep']}, dp={lay['dp']}); continue "
          f"with: unimoe train --config ... --out {args.out} --resume auto parallel.tp={lay['tp']} "
          f"parallel.ep={lay['ep']} (on {lay['world_size']} processes)")
    return 0
