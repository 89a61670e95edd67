"""Routing statistics (detached, computed on demand): load, experts per token, null share, entropy.

Task ids: 0 = speech, 1 = music (TASK_NAMES; other ids count in the overall stats only); -1 marks tokens to
ignore (padding). The stats are made of sums (count_sums), so they can be added up over ranks.
"""

from __future__ import annotations

import math

import torch

TASK_NAMES = {0: "speech", 1: "music"}


def count_sums(selected: torch.Tensor, probs: torch.Tensor, task_ids: torch.Tensor | None,
               num_routed: int) -> torch.Tensor:
    """fp32 [1 + len(TASK_NAMES), 3 + E] detached sums the stats are made of, over the valid tokens (row 0)
    and per task id (rows 1..): tokens, tokens that keep only null experts, router entropy sum, then the
    tokens keeping each candidate. Sums add up across ranks: under sequence parallelism the layer
    all-reduces them over the TP group, so the stats cover all of the micro-batch's tokens."""
    sel = selected.detach().float()
    ent = -(probs.detach().float() * probs.detach().float().clamp(min=1e-30).log()).sum(-1)
    per_token = torch.cat([torch.ones_like(ent)[:, None], (sel[:, :num_routed].sum(1) == 0).float()[:, None],
                           ent[:, None], sel], dim=1)  # [T, 3 + E]
    if task_ids is None:
        rows = torch.ones(1, sel.shape[0], device=sel.device)
        rows = torch.cat([rows, torch.zeros(len(TASK_NAMES), sel.shape[0], device=sel.device)])
    else:
        t = task_ids.detach().reshape(-1)
        rows = torch.stack([(t >= 0).float()] + [(t == k).float() for k in range(len(TASK_NAMES))])
    return rows @ per_token


def _stats_from_sums(row: list[float], num_routed: int, threshold: float) -> dict:
    n_tok, all_null, ent_sum, sel_sum = row[0], row[1], row[2], row[3:]
    n = max(n_tok, 1.0)
    routed_total = sum(sel_sum[:num_routed])
    share = [c / max(routed_total, 1.0) for c in sel_sum[:num_routed]]
    nz = [v for v in share if v > 0]
    load_entropy = -sum(v * math.log(v) for v in nz) / math.log(num_routed) if num_routed > 1 else 1.0
    if routed_total == 0:
        load_entropy = 0.0
    slots = sum(sel_sum)
    return {
        "tokens": int(round(n_tok)),
        "load": [c / n for c in sel_sum],
        "routed_share": share,
        "experts_per_token": routed_total / n,
        "candidates_per_token": slots / n,
        "null_share": sum(sel_sum[num_routed:]) / slots if slots > 0 else 0.0,
        "all_null_fraction": all_null / n,
        "router_entropy": ent_sum / n,
        "load_entropy": load_entropy,
        "collapsed": bool(n_tok > 0 and load_entropy < threshold),
    }


def routing_stats(selected: torch.Tensor, probs: torch.Tensor, task_ids: torch.Tensor | None,
                  num_routed: int, threshold: float, sums: torch.Tensor | None = None) -> dict:
    """Stats over the valid tokens (task id >= 0), plus "per_task": {task id: stats} for the tasks present.
    `sums` (count_sums, e.g. all-reduced over the sequence-parallel group) replaces this rank's own."""
    if sums is None:
        sums = count_sums(selected, probs, task_ids, num_routed)
    rows = sums.cpu().tolist()
    out = _stats_from_sums(rows[0], num_routed, threshold)
    out["per_task"] = {t: _stats_from_sums(rows[1 + t], num_routed, threshold)
                       for t in range(len(TASK_NAMES)) if task_ids is not None and rows[1 + t][0] > 0}
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
