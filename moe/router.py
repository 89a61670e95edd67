"""Top-P ("dynamic capacity") routing over routed + null experts, with gated shared experts.

Shape legend: T = tokens, R = routed, Z = null, S = shared experts, E = R + Z dynamic candidates.

Per token (paper Eq. 1-3): p = softmax(dynamic logits); sort descending; keep the smallest prefix whose
cumulative probability reaches top_p, bounded by [min_k, max_k] (min_k == max_k: plain top-k). Ties are
broken towards the lower expert index (stable sort). The kept candidates' combine weights follow
`MoEConfig.combine_weights` (see `combine_weights`). With gated shared experts (reference code), a second
softmax over the kept dynamic logits plus the shared logits gives each shared expert its weight, and the
dynamic weights are scaled by the dynamic part of that softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.config import MoEConfig


@dataclass
class Routing:
    selected: torch.Tensor  # bool [T, E] kept dynamic candidates
    weights: torch.Tensor  # fp32 [T, E] combine weights, 0 where not kept (null columns included)
    shared_weights: torch.Tensor | None  # fp32 [T, S] (None without shared experts or ungated)
    probs: torch.Tensor  # fp32 [T, E] softmax over the dynamic candidates


def gate_logits(x_TD: torch.Tensor, weight: torch.Tensor, jitter_eps: float = 0.0,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 router logits [T, R + Z + S] = (x * U(1 - eps, 1 + eps)) @ weight^T (jitter_eps 0: no noise).
    In fp32 whatever the model's dtype: 1 +- 0.01 is not representable in bf16. `uniform` [T, D] in [0, 1)
    gives the noise (moe.seeding.keyed_uniform); None draws it from the torch RNG."""
    x = x_TD.float()
    if jitter_eps > 0:
        if uniform is None:
            uniform = torch.empty_like(x).uniform_()
        x = x * (1.0 - jitter_eps + (2.0 * jitter_eps) * uniform)
    return x @ weight.float().t()


def top_p_select(probs: torch.Tensor, top_p: float, min_k: int = 1, max_k: int | None = None) -> torch.Tensor:
    """bool [T, E]: the smallest descending prefix of `probs` whose cumulative sum reaches `top_p`."""
    n_exp = probs.shape[-1]
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    # number of entries strictly below the threshold, plus the one that crosses it
    k = (sorted_p.cumsum(-1) < top_p).sum(-1) + 1
    k = k.clamp(min=min_k, max=n_exp if max_k is None else max_k)
    keep_sorted = torch.arange(n_exp, device=probs.device) < k.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _released_code_multipliers(logits: torch.Tensor, tie_eps: float) -> torch.Tensor:
    """[T, E]: the released code's per-candidate multiplier (its sparsemixer without the differentiable
    router): candidates taken by descending logit, each gets the softmax, over itself and the candidates
    after it whose logit l_j is within a relative 2 * tie_eps of its own l_i ((l_i - l_j) <= 2 eps
    max(|l_i|, |l_j|)), taken at itself."""
    s, order = logits.sort(dim=-1, descending=True, stable=True)
    with torch.no_grad():
        n = s.shape[-1]
        s_i, s_j = s.unsqueeze(-1), s.unsqueeze(-2)  # [T, E(i), 1], [T, 1, E(j)]
        later = torch.ones(n, n, dtype=torch.bool, device=s.device).triu()
        window = later & (s_i - s_j <= 2 * tie_eps * torch.maximum(s_i.abs(), s_j.abs()))
    # softmax over the window at i = 1 / sum_j exp(l_j - l_i); masked before exp (no inf * 0 in backward)
    m_sorted = 1.0 / (s.unsqueeze(-2) - s.unsqueeze(-1)).masked_fill(~window, float("-inf")).exp().sum(-1)
    return torch.empty_like(m_sorted).scatter(-1, order, m_sorted)


def combine_weights(logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor, cfg: MoEConfig):
    """fp32 [T, E] weights of the kept dynamic candidates (0 elsewhere), from the dynamic logits and probs.

    What each mode does to the gate's gradient through the routed outputs (K = the kept set, w_i its
    weights, l the dynamic logits; the kept set itself is a discrete choice and has no gradient):
    - "renormalize" (paper Eq. 3): w_i = p_i / sum_K p_j = softmax over the kept logits, so
      dw_i/dl_j = w_i (delta_ij - w_j) for i, j in K and 0 for j outside K: the gate learns which kept
      candidate should weigh more, a kept null expert included; a token that keeps one candidate gets
      weight 1 and no gradient.
    - "raw" (Huang et al. 2024): w_i = p_i, dw_i/dl_j = p_i (delta_ij - p_j) for every candidate j, the
      dropped ones included (their logits are pushed down by what the kept experts return); weights sum
      to the kept mass (>= top_p), not 1.
    - "reference" (the released code, ignore_differentiable_router=True): each kept candidate gets the
      softmax over the near-ties at its rank (`_released_code_multipliers`), renormalised over K. Unless
      logits tie within 2 * tie_eps (relative), every multiplier is exactly 1, so w_i = 1 / |K| and the
      routed outputs send no gradient to the gate: it learns only through the shared-expert split
      (gate_shared) and the balance loss.
    """
    if cfg.combine_weights == "raw":
        return probs * selected
    base = probs if cfg.combine_weights == "renormalize" else _released_code_multipliers(logits, cfg.tie_eps)
    kept = base * selected
    return kept / kept.sum(-1, keepdim=True)


def route(logits: torch.Tensor, cfg: MoEConfig) -> Routing:
    """Routing decisions and combine weights from fp32 gate logits [T, R + Z + S]."""
    n_dyn = cfg.num_dynamic_experts
    dyn_logits = logits[:, :n_dyn]
    probs = torch.softmax(dyn_logits, dim=-1)
    with torch.no_grad():
        selected = top_p_select(probs, cfg.top_p, cfg.min_k, cfg.max_k)
    weights = combine_weights(dyn_logits, probs, selected, cfg)
    shared_weights = None
    if cfg.num_shared_experts > 0 and cfg.gate_shared:
        # softmax over {kept dynamic} U {shared}: the dynamic part scales the dynamic weights
        mask = torch.cat([selected, selected.new_ones(selected.shape[0], cfg.num_shared_experts)], dim=-1)
        joint = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        weights = weights * joint[:, :n_dyn].sum(-1, keepdim=True)
        shared_weights = joint[:, n_dyn:]
    return Routing(selected=selected, weights=weights, shared_weights=shared_weights, probs=probs)
