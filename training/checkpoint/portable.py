"""Layout-independent training state, written beside each DeepSpeed checkpoint: TAG/portable/*.pt.

DeepSpeed stores ZeRO-1/2 optimizer state as flat partitions whose shape depends on the data-parallel
and expert-parallel sizes, and cannot load them at another layout. So every save also writes, per
parameter NAME (experts under their global index, "layers.0.ffn.experts.5.up_proj.weight"):
    params[name]      fp32 master weight (ZeRO's fp32 copy; the module weight for frozen params)
    exp_avg[name]     AdamW first moment      (absent before the first optimizer step)
    exp_avg_sq[name]  AdamW second moment
    adam_step         AdamW's step count (one value: every group steps together)
File TAG/portable/tp{t}_rank{r}.pt holds what rank r writes: each tensor is gathered (a reduce over
the ranks that hold its ZeRO shards or replicas: the data-parallel group, or the expert-data-parallel
group for experts) onto one of those ranks, round-robin, so writing is spread and no rank holds the whole
model. The union of one TP rank's files is the whole model. Loading it into an engine of any EP/DP
layout (same TP) restores weights and optimizer exactly.

Gathering is collective: every rank calls `gather_portable` with the same model structure.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

OPT_KEYS = ("exp_avg", "exp_avg_sq")


def is_expert_param(p) -> bool:
    return getattr(p, "allreduce", True) is False


def _zero_optimizer(engine):
    opt = engine.optimizer
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


def _optimizer_has_state(engine) -> bool:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return any(len(s) for s in getattr(base, "state", {}).values())


def _adam_step(engine) -> int:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _fragment(p, zopt, key):
    """(flat source tensor or None, hp address, lp address) of this rank's piece of ZeRO-1/2 param p."""
    m = p._hp_mapping
    if m is None:
        return None, None, None
    flat = zopt.single_partition_of_fp32_groups[m.param_group_index]
    src = flat if key is None else zopt.optimizer.state.get(flat, {}).get(key)
    return src, m.hp_fragment_address, m.lp_fragment_address


def _zero12_full(p, zopt, key, dst: int) -> torch.Tensor:
    """Collective over p's data-parallel group: the full fp32 master weight (key None) or AdamW state,
    summed onto global rank `dst` (the others get partial sums they drop). Reads ZeRO's flat partitions
    directly (DeepSpeed's per-param optimizer views go stale after a load)."""
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    src, hp, lp = _fragment(p, zopt, key)
    if src is not None:
        buf.narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
    dist.reduce(buf, dst=dst, group=p._dp_group)
    return buf.view(p.shape)


def _zero12_set(p, zopt, value: torch.Tensor, key=None) -> None:
    dst, hp, lp = _fragment(p, zopt, key)
    if dst is not None:
        dst.narrow(0, hp.start, hp.numel).copy_(value.flatten().to(dst.dtype).narrow(0, lp.start, lp.numel))


def _replica_group(p, pg):
    """The ranks that hold (parts of) the same tensor p: ZeRO's group for it, else the expert-data-parallel
    group (experts) or the data-parallel group."""
    if getattr(p, "_dp_group", None) is not None:
        return p._dp_group
    if is_expert_param(p):
        from deepspeed.utils import groups
        return groups._get_expert_data_parallel_group(p.group_name)
    return pg.dp_group if pg.dp_group is not None else dist.group.WORLD


def gather_portable(engine, pg) -> dict:
    """Collective. Returns the part this rank writes: tensors are spread round-robin over the ranks of
    each replica group (no rank holds the whole model); non-parameter buffers go to DP rank 0."""
    model = engine.module
    zero_stage = engine.zero_optimization_stage()
    zopt = _zero_optimizer(engine)
    has_state = _optimizer_has_state(engine)
    out = {"params": {}, "buffers": {}, "exp_avg": {}, "exp_avg_sq": {}, "adam_step": _adam_step(engine)}
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    counters: dict[tuple, int] = {}
    for name, p in model.named_parameters():
        ranks = tuple(dist.get_process_group_ranks(_replica_group(p, pg)))
        i = counters.get(ranks, 0)
        counters[ranks] = i + 1
        dst = ranks[i % len(ranks)]
        if zopt is not None and hasattr(p, "_hp_mapping"):  # ZeRO 1/2, trainable
            w = _zero12_full(p, zopt, None, dst)
            states = {k: _zero12_full(p, zopt, k, dst) for k in OPT_KEYS} if has_state else {}
        elif hasattr(p, "ds_id"):  # ZeRO 3
            w = safe_get_full_fp32_param(p)
            states = {k: safe_get_full_optimizer_state(p, k) for k in OPT_KEYS} if has_state else {}
        else:  # frozen, or no ZeRO: every replica holds it
            w = p.detach().float()
            st = base.state.get(p, {}) if zero_stage == 0 else {}
            states = {k: st[k].float() for k in OPT_KEYS if k in st}
        if dst == dist.get_rank():
            out["params"][name] = w.detach().float().cpu().clone()
            for k, v in states.items():
                if v is not None:
                    out[k][name] = v.detach().float().cpu().clone()
    if pg.dp_rank == 0:
        param_names = {n for n, _ in model.named_parameters()}
        for name, b in model.state_dict().items():
            if name not in param_names:
                out["buffers"][name] = b.detach().cpu().clone()
    return out


def save_portable(engine, pg, tag_dir: str) -> None:
    state = gather_portable(engine, pg)
    d = os.path.join(tag_dir, "portable")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"tp{pg.tp_rank}_rank{pg.env.rank:05d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_portable(tag_dir: str, tp_rank: int = 0) -> dict:
    """Union of a TP rank's portable files -> {"params", "buffers", "exp_avg", "exp_avg_sq", "adam_step"}."""
    files = sorted(glob.glob(os.path.join(tag_dir, "portable", f"tp{tp_rank}_rank*.pt")))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no portable/tp{tp_rank}_rank*.pt (written by every save of "
                                "this trainer; a checkpoint without it can only resume at its own layout)")
    merged = {"params": {}, "buffers": {}, "exp_avg": {}, "exp_avg_sq": {}, "adam_step": 0}
    for f in files:
        part = torch.load(f, map_location="cpu", weights_only=False)
        for k in ("params", "buffers", "exp_avg", "exp_avg_sq"):
            merged[k].update(part[k])
        merged["adam_step"] = max(merged["adam_step"], int(part["adam_step"]))
    return merged


def _init_zero_optimizer_state(zopt, adam_step: int) -> None:
    """Create AdamW state on ZeRO's flat fp32 partitions (as after a step) and link DeepSpeed's views."""
    base = zopt.optimizer
    for flat in zopt.single_partition_of_fp32_groups:
        base.state[flat] = {"step": torch.tensor(float(adam_step)),
                            "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    zopt._hp_optimizer_states_linked = False
    zopt._lazy_init_hp_params_optimizer_state()


def load_portable(engine, state: dict, load_optimizer: bool = True) -> None:
    """Load weights (+ AdamW state) by parameter name into an engine of any EP/DP layout (same TP)."""
    model = engine.module
    params = state["params"]
    missing = [n for n, _ in model.named_parameters() if n not in params]
    if missing:
        raise KeyError(f"portable checkpoint lacks {len(missing)} parameters of this model, e.g. "
                       f"{missing[:3]}; was it saved from a different model config?")
    zero_stage = engine.zero_optimization_stage()
    zopt = _zero_optimizer(engine)
    with_opt = load_optimizer and bool(state["exp_avg"])
    if with_opt and zopt is not None:
        _init_zero_optimizer_state(zopt, state["adam_step"])
    elif with_opt and zero_stage == 3:
        raise NotImplementedError("loading portable optimizer state under ZeRO-3 is not supported; "
                                  "resume at the saved layout (DeepSpeed's own files) instead")
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = params[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"portable checkpoint: {name} has shape {tuple(w.shape)}, model wants "
                                 f"{tuple(p.shape)} (different model config or TP size)")
            p.data.copy_(w.to(p.dtype))
            if zopt is not None and hasattr(p, "_hp_mapping"):
                _zero12_set(p, zopt, w)
                if with_opt:
                    for k in OPT_KEYS:
                        if name in state[k]:
                            _zero12_set(p, zopt, state[k][name], k)
            elif with_opt and zero_stage == 0 and p.requires_grad and name in state["exp_avg"]:
                base.state[p] = {"step": torch.tensor(float(state["adam_step"])),
                                 **{k: state[k][name].clone().to(p.dtype) for k in OPT_KEYS}}
        for name, b in model.named_buffers():
            if name in state["buffers"]:
                b.copy_(state["buffers"][name])
    if dist.is_initialized():
        dist.barrier()
