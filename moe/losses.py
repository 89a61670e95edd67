"""Router losses: the Switch-style balance loss over the dynamic candidates, z-loss, entropy loss.

Each MoE layer returns the unweighted values in its aux; `combine_aux` averages them over layers and
applies the weights (the balance weight decays linearly, 0.025 -> 0.001 over 10k steps in the paper).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe.config import MoEConfig


def router_losses(logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor, num_dynamic: int,
                  valid: torch.Tensor | None = None, token_group=None, extra: torch.Tensor | None = None):
    """(balance, z, entropy) as fp32 scalars, averaged over valid tokens.

    balance = E * sum_e f_e * P_e, f_e = fraction of tokens that keep candidate e (multi-hot),
    P_e = mean router probability of e renormalised over each token's kept set (reference code).
    z = mean logsumexp(logits)^2 over all gate logits; entropy = mean -sum p log p over the dynamic softmax.

    token_group (sequence parallelism): this rank holds 1/n of the tokens of the group. The token sums
    are all-reduced, so the values are those of all the group's tokens, while the gradients are this
    rank's share (the replicated router's gradients are summed over the group, which adds the shares up).
    `extra` (detached fp32, e.g. routing count sums) rides along in the same all-reduce: the 4th value
    returned is it summed over token_group (extra itself without a group).
    """
    m = torch.ones_like(probs[:, :1]) if valid is None else valid.reshape(-1, 1).to(probs.dtype)
    sel = selected.to(probs.dtype)
    kept = probs * sel
    kept = kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)
    sums = [(kept * m).sum(0), (torch.logsumexp(logits, dim=-1).pow(2) * m[:, 0]).sum(),
            (-(probs * probs.clamp(min=1e-30).log()).sum(-1) * m[:, 0]).sum()]
    count, f_sum = m.sum(), (sel * m).sum(0)
    totals = None
    if token_group is not None:
        tail = [] if extra is None else [extra.reshape(-1).to(count.dtype)]
        flat = torch.cat([count.view(1), f_sum] + [t.detach().reshape(-1) for t in sums] + tail)
        dist.all_reduce(flat, group=token_group)
        count, f_sum = flat[0], flat[1: 1 + f_sum.numel()]
        totals = flat[1 + f_sum.numel():].split([t.numel() for t in sums] + [t.numel() for t in tail])
        if extra is not None:
            extra = totals[-1].view_as(extra)
    count = count.clamp(min=1.0)
    f = f_sum / count

    def mean(i):
        local = sums[i] / count
        return local if totals is None else local + (totals[i].view_as(local) / count - local).detach()

    balance = num_dynamic * (f * mean(0)).sum()
    return balance, mean(1), mean(2), extra


def balance_weight(step: int, cfg: MoEConfig) -> float:
    """Linear decay from cfg.balance_weight to cfg.balance_weight_min over cfg.balance_decay_steps."""
    if cfg.balance_decay_steps <= 0:
        return cfg.balance_weight
    frac = min(max(step, 0) / cfg.balance_decay_steps, 1.0)
    return cfg.balance_weight + (cfg.balance_weight_min - cfg.balance_weight) * frac


def combine_aux(aux_list, step: int, cfg: MoEConfig, host: bool = True) -> tuple[torch.Tensor, dict]:
    """Weighted total of the router losses (mean over layers) and a dict of floats for logging (one
    device-to-host copy for all of them; host=False: detached 0-dim tensors, no copy)."""
    if not aux_list:
        return torch.zeros(()), {}
    bal = torch.stack([a.balance_loss for a in aux_list]).mean()
    z = torch.stack([a.z_loss for a in aux_list]).mean()
    ent = torch.stack([a.entropy_loss for a in aux_list]).mean()
    w = balance_weight(step, cfg)
    total = w * bal
    if cfg.z_loss_weight > 0:
        total = total + cfg.z_loss_weight * z
    if cfg.entropy_loss_weight > 0:
        total = total + cfg.entropy_loss_weight * ent
    values = torch.stack([bal, z, ent, total]).detach()
    values = values.tolist() if host else values.unbind()
    logs = dict(zip(("balance_loss", "z_loss", "entropy_loss", "aux_loss"), values), balance_weight=w)
    return total, logs
