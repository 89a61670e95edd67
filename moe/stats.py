"""Routing statistics (detached, computed on demand): load, experts per token, null share, entropy.

Task ids: 0 = speech, 1 = music (any int >= 0 works); -1 marks tokens to ignore (padding).
"""

from __future__ import annotations

import math

import torch

TASK_NAMES = {0: "speech", 1: "music"}


def _group_stats(selected: torch.Tensor, probs: torch.Tensor, num_routed: int, threshold: float) -> dict:
    n_tok = selected.shape[0]
    sel = selected.float()
    routed = sel[:, :num_routed]
    load = sel.mean(0) if n_tok else sel.sum(0)  # fraction of tokens that keep each candidate
    routed_total = routed.sum()
    share = routed.sum(0) / routed_total.clamp(min=1.0)
    nz = share[share > 0]
    load_entropy = float(-(nz * nz.log()).sum() / math.log(num_routed)) if num_routed > 1 else 1.0
    if routed_total == 0:
        load_entropy = 0.0
    ent = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
    slots = sel.sum()
    return {
        "tokens": n_tok,
        "load": load.tolist(),
        "routed_share": share.tolist(),
        "experts_per_token": float(routed.sum(1).mean()) if n_tok else 0.0,
        "candidates_per_token": float(sel.sum(1).mean()) if n_tok else 0.0,
        "null_share": float(sel[:, num_routed:].sum() / slots) if slots > 0 else 0.0,
        "all_null_fraction": float((routed.sum(1) == 0).float().mean()) if n_tok else 0.0,
        "router_entropy": float(ent.mean()) if n_tok else 0.0,
        "load_entropy": load_entropy,
        "collapsed": bool(n_tok > 0 and load_entropy < threshold),
    }


def routing_stats(selected: torch.Tensor, probs: torch.Tensor, task_ids: torch.Tensor | None,
                  num_routed: int, threshold: float) -> dict:
    """Stats over the valid tokens (task id >= 0), plus "per_task": {task id: stats}."""
    selected, probs = selected.detach().cpu(), probs.detach().float().cpu()
    if task_ids is None:
        return {**_group_stats(selected, probs, num_routed, threshold), "per_task": {}}
    task_ids = task_ids.detach().reshape(-1).cpu()
    valid = task_ids >= 0
    out = _group_stats(selected[valid], probs[valid], num_routed, threshold)
    out["per_task"] = {
        int(t): _group_stats(selected[task_ids == t], probs[task_ids == t], num_routed, threshold)
        for t in torch.unique(task_ids[valid]).tolist()}
    return out


_SCALARS = ("experts_per_token", "null_share", "all_null_fraction", "router_entropy", "load_entropy")


def summarize(aux_list, prefix: str = "moe") -> dict[str, float]:
    """Flat {name: float} for logging: per layer and per task, plus the mean over layers."""
    out: dict[str, float] = {}
    for i, aux in enumerate(aux_list):
        st = aux.stats
        groups = [("", st)] + [(f"/{TASK_NAMES.get(t, f'task{t}')}", s) for t, s in st["per_task"].items()]
        for suffix, s in groups:
            for key in _SCALARS:
                out[f"{prefix}/layer{i}{suffix}/{key}"] = s[key]
            out[f"{prefix}/layer{i}{suffix}/collapsed"] = float(s["collapsed"])
    if aux_list:
        for key in _SCALARS:
            vals = [aux.stats[key] for aux in aux_list]
            out[f"{prefix}/{key}"] = sum(vals) / len(vals)
        out[f"{prefix}/collapsed_layers"] = float(sum(aux.stats["collapsed"] for aux in aux_list))
    return out
