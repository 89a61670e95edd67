"""The routing report: how each MoE layer splits speech and music tokens over its experts.

Computed from the raw routing decisions every MoE layer exposes (`aux.selected`, a bool
[N, routed + null] multi-hot of the experts each token was sent to, and the task id of each
token: 0 = speech, 1 = music, -1 = ignored). Columns [0, routed) are routed experts, the last
`null` columns are null experts (zero output, zero FLOPs).

Per layer and per task (the same definitions as moe/stats.py, which logs them during training):
  tokens             number of tokens of the task that were routed
  load[e]            fraction of the task's tokens that selected column e (null columns included);
                     the heatmaps show this
  routed_share[e]    share of the task's routed-expert assignments that went to expert e (sums to 1)
  experts_per_token  mean number of *routed* (computing) experts per token
  null_share         share of the task's assignments (routed + null) that went to null experts
  all_null_fraction  fraction of the task's tokens that selected no routed expert at all
and per layer `task_divergence`: total-variation distance between the speech and music
routed_share (0 = identical use of experts, 1 = disjoint experts: full decoupling).

`count_decisions` and `routing_report` are pure functions so tests can recompute every number
from the raw decisions; `RoutingAccumulator` sums counts over batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

TASKS = ("speech", "music")


def count_decisions(selected: torch.Tensor, task_ids: torch.Tensor | None, num_tasks: int = len(TASKS)):
    """Raw decisions of one layer -> (tokens [num_tasks], picks [num_tasks, E]).

    selected: bool [N, E]; task_ids: long [N] (or any shape with N elements), -1 = ignore.
    Returns tokens[t] = number of task-t tokens, picks[t, e] = task-t tokens that selected column e.
    """
    sel = selected.reshape(-1, selected.shape[-1]).to(torch.float64).cpu()
    if task_ids is None:
        raise ValueError("routing report needs per-token task ids (the model passes them to the MoE layer)")
    tid = task_ids.reshape(-1).to(torch.long).cpu()
    if tid.numel() != sel.shape[0]:
        raise ValueError(f"routing decisions cover {sel.shape[0]} tokens but task_ids has {tid.numel()}")
    onehot = torch.zeros(sel.shape[0], num_tasks, dtype=torch.float64)
    keep = (tid >= 0) & (tid < num_tasks)
    onehot[keep.nonzero(as_tuple=True)[0], tid[keep]] = 1.0
    tokens = onehot.sum(0)  # [T]
    picks = onehot.t() @ sel  # [T, E]
    return tokens.numpy(), picks.numpy()


def count_all_null(selected: torch.Tensor, task_ids: torch.Tensor, num_routed: int,
                   num_tasks: int = len(TASKS)) -> np.ndarray:
    """Per task, the number of tokens that selected no routed expert (only null experts)."""
    sel = selected.reshape(-1, selected.shape[-1]).cpu()
    tid = task_ids.reshape(-1).to(torch.long).cpu()
    no_routed = ~sel[:, :num_routed].any(dim=1)
    return np.array([float((no_routed & (tid == t)).sum()) for t in range(num_tasks)])


@dataclass
class RoutingCounts:
    """Summed decisions: tokens [L, T], picks [L, T, E], all_null [L, T]."""

    num_routed: int
    num_null: int
    tokens: np.ndarray
    picks: np.ndarray
    all_null: np.ndarray


@dataclass
class RoutingAccumulator:
    """Sums the routing decisions of every MoE layer over evaluation batches."""

    num_routed: int
    num_null: int
    num_layers: int
    layer_ids: list[int] = field(default_factory=list)  # model layer index of each MoE layer, for labels
    _tokens: np.ndarray = None
    _picks: np.ndarray = None
    _all_null: np.ndarray = None

    def __post_init__(self):
        e = self.num_routed + self.num_null
        self._tokens = np.zeros((self.num_layers, len(TASKS)))
        self._picks = np.zeros((self.num_layers, len(TASKS), e))
        self._all_null = np.zeros((self.num_layers, len(TASKS)))

    def update(self, layer: int, selected: torch.Tensor, task_ids: torch.Tensor) -> None:
        e = self.num_routed + self.num_null
        if selected.shape[-1] != e:
            raise ValueError(f"layer {layer}: routing decisions have {selected.shape[-1]} columns, "
                             f"expected {self.num_routed} routed + {self.num_null} null")
        tokens, picks = count_decisions(selected, task_ids)
        self._tokens[layer] += tokens
        self._picks[layer] += picks
        self._all_null[layer] += count_all_null(selected, task_ids, self.num_routed)

    def counts(self) -> RoutingCounts:
        return RoutingCounts(self.num_routed, self.num_null, self._tokens.copy(), self._picks.copy(),
                             self._all_null.copy())


def _safe_div(a, b):
    return float(a) / float(b) if b else 0.0


def routing_report(counts: RoutingCounts, layer_ids: list[int] | None = None) -> dict:
    """The report (JSON-serialisable) from summed counts. See the module docstring for definitions."""
    r, n = counts.num_routed, counts.num_null
    num_layers = counts.tokens.shape[0]
    layer_ids = list(layer_ids) if layer_ids else list(range(num_layers))
    names = [f"expert{e}" for e in range(r)] + [f"null{e}" for e in range(n)]
    layers = []
    for li in range(num_layers):
        entry = {"layer": layer_ids[li], "tokens": {}, "load": {}, "routed_share": {},
                 "experts_per_token": {}, "null_share": {}, "all_null_fraction": {}}
        for t, task in enumerate(TASKS):
            tok = counts.tokens[li, t]
            picks = counts.picks[li, t]
            total = picks.sum()
            entry["tokens"][task] = int(tok)
            entry["load"][task] = [_safe_div(p, tok) for p in picks]
            entry["routed_share"][task] = [_safe_div(p, picks[:r].sum()) for p in picks[:r]]
            entry["experts_per_token"][task] = _safe_div(picks[:r].sum(), tok)
            entry["null_share"][task] = _safe_div(picks[r:].sum(), total)
            entry["all_null_fraction"][task] = _safe_div(counts.all_null[li, t], tok)
        entry["task_divergence"] = task_divergence(counts.picks[li, 0, :r], counts.picks[li, 1, :r])
        layers.append(entry)
    summary = {}
    for key in ("experts_per_token", "null_share"):
        summary[key] = {task: (float(np.mean([lay[key][task] for lay in layers])) if layers else 0.0)
                        for task in TASKS}
    summary["task_divergence"] = float(np.mean([lay["task_divergence"] for lay in layers])) if layers else 0.0
    return {"num_routed_experts": r, "num_null_experts": n, "experts": names, "tasks": list(TASKS),
            "layers": layers, "summary": summary}


def task_divergence(picks_a: np.ndarray, picks_b: np.ndarray) -> float:
    """Total-variation distance between two tasks' routed_share."""
    sa, sb = float(np.sum(picks_a)), float(np.sum(picks_b))
    if sa == 0 or sb == 0:
        return 0.0
    return 0.5 * float(np.abs(np.asarray(picks_a) / sa - np.asarray(picks_b) / sb).sum())


def load_matrix(report: dict, task: str) -> np.ndarray:
    """[layers, experts] load of one task, as drawn in the heatmap."""
    return np.array([lay["load"][task] for lay in report["layers"]]).reshape(len(report["layers"]), -1)


def plot_report(report: dict):
    """Two matplotlib figures: load heatmaps (speech, music, difference) and per-layer capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["experts"]
    ylabels = [f"L{lay['layer']}" for lay in report["layers"]]
    speech, music = load_matrix(report, "speech"), load_matrix(report, "music")
    heat, axes = plt.subplots(1, 3, figsize=(2 + 1.35 * len(names), 1.5 + 0.45 * max(len(ylabels), 2)),
                              constrained_layout=True)
    vmax = max(float(speech.max(initial=0)), float(music.max(initial=0)), 1e-6)
    diff = speech - music
    dmax = max(float(np.abs(diff).max(initial=0)), 1e-6)
    for ax, mat, title, cmap, lim in ((axes[0], speech, "speech load", "viridis", (0, vmax)),
                                      (axes[1], music, "music load", "viridis", (0, vmax)),
                                      (axes[2], diff, "speech - music", "coolwarm", (-dmax, dmax))):
        im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_title(title)
        ax.set_xticks(range(len(names)), [n.replace("expert", "e") for n in names], rotation=90)
        ax.set_yticks(range(len(ylabels)), ylabels)
        heat.colorbar(im, ax=ax, shrink=0.8)
    heat.suptitle("fraction of each task's tokens routed to each expert, per MoE layer")

    cap, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    x = range(len(ylabels))
    for task in TASKS:
        ax1.plot(x, [lay["experts_per_token"][task] for lay in report["layers"]], marker="o", label=task)
        ax2.plot(x, [lay["null_share"][task] for lay in report["layers"]], marker="o", label=task)
    for ax, title, top in ((ax1, "routed experts per token", report["num_routed_experts"]),
                           (ax2, "null-expert share", 1.0)):
        ax.set_xticks(list(x), ylabels)
        ax.set_ylim(0, top)  # the full range: small task differences stay small
        ax.set_title(title)
        ax.legend()
    return {"routing_load": heat, "routing_capacity": cap}
