"""Router losses: the Switch-style balance loss over the dynamic candidates, z-loss, entropy loss.

Each MoE layer returns the unweighted values in its aux; `combine_aux` averages them over layers and
applies the weights (the balance weight decays linearly, 0.025 -> 0.001 over 10k steps in the paper).
"""

from __future__ import annotations

import torch

from moe.config import MoEConfig


def router_losses(logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor, num_dynamic: int,
                  valid: torch.Tensor | None = None):
    """(balance, z, entropy) as fp32 scalars, averaged over valid tokens.

    balance = E * sum_e f_e * P_e, f_e = fraction of tokens that keep candidate e (multi-hot),
    P_e = mean router probability of e renormalised over each token's kept set (reference code).
    z = mean logsumexp(logits)^2 over all gate logits; entropy = mean -sum p log p over the dynamic softmax.
    """
    m = torch.ones_like(probs[:, :1]) if valid is None else valid.reshape(-1, 1).to(probs.dtype)
    count = m.sum().clamp(min=1.0)
    sel = selected.to(probs.dtype)
    kept = probs * sel
    kept = kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)
    f = (sel * m).sum(0) / count
    p = (kept * m).sum(0) / count
    balance = num_dynamic * (f * p).sum()
    z = (torch.logsumexp(logits, dim=-1).pow(2) * m[:, 0]).sum() / count
    entropy = (-(probs * probs.clamp(min=1e-30).log()).sum(-1) * m[:, 0]).sum() / count
    return balance, z, entropy


def balance_weight(step: int, cfg: MoEConfig) -> float:
    """Linear decay from cfg.balance_weight to cfg.balance_weight_min over cfg.balance_decay_steps."""
    if cfg.balance_decay_steps <= 0:
        return cfg.balance_weight
    frac = min(max(step, 0) / cfg.balance_decay_steps, 1.0)
    return cfg.balance_weight + (cfg.balance_weight_min - cfg.balance_weight) * frac


def combine_aux(aux_list, step: int, cfg: MoEConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total of the router losses (mean over layers) and a dict of floats for logging (one
    device-to-host copy for all of them)."""
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
    values = torch.stack([bal, z, ent, total]).detach().tolist()
    logs = dict(zip(("balance_loss", "z_loss", "entropy_loss", "aux_loss"), values), balance_weight=w)
    return total, logs
