"""Top-P ("dynamic capacity") routing over routed + null experts, with gated shared experts.

Shape legend: N = tokens, R = routed, Z = null, S = shared experts, E = R + Z dynamic candidates.

Per token (paper Eq. 1-3): p = softmax(dynamic logits); sort descending; keep the smallest prefix whose
cumulative probability reaches top_p, bounded by [min_k, max_k] (min_k == max_k: plain top-k); weights
are p renormalised over the kept set, null included, so a kept null expert lowers what the real experts
contribute (`renormalize=False`: the raw softmax values, Huang et al. 2024). Ties are broken towards the
lower expert index (stable sort). With gated shared experts (reference code), a second softmax over the
kept dynamic logits plus the shared logits gives each shared expert its weight, and the dynamic weights
are scaled by the dynamic part of that softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.config import MoEConfig


@dataclass
class Routing:
    selected: torch.Tensor  # bool [N, E] kept dynamic candidates
    weights: torch.Tensor  # fp32 [N, E] combine weights, 0 where not kept (null columns included)
    shared_weights: torch.Tensor | None  # fp32 [N, S] (None without shared experts or ungated)
    probs: torch.Tensor  # fp32 [N, E] softmax over the dynamic candidates
    logits: torch.Tensor  # fp32 [N, R + Z + S] raw gate logits


def jitter_noise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiplicative input jitter U(1 - eps, 1 + eps), x's shape and dtype.

    On CPU the noise has 16-bit resolution (steps of eps / 32768, a few fp32 ulps of 1.0): four values
    per 64 random bits, a third of the cost of torch's one-draw-per-element uniform_ (measured 6 ms for
    a 4096 x 512 input, the largest non-GEMM cost of the layer on CPU)."""
    if x.device.type != "cpu":
        return torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
    return bits.view(torch.int16)[:n].view(x.shape).to(x.dtype).mul_(eps / 32768).add_(1.0)


class _JitteredGate(torch.autograd.Function):
    """(x * noise) @ w^T. The GEMM runs against w padded to a multiple of 16 rows (a ~10-column output is
    twice as slow on CPU); backward scales the input gradient by the noise in place."""

    @staticmethod
    def forward(ctx, x, w, eps: float):
        noise = jitter_noise(x, eps)
        xn = x * noise
        w_pad = w.new_zeros(-(-w.shape[0] // 16) * 16, w.shape[1])
        w_pad[: w.shape[0]] = w
        ctx.save_for_backward(xn, noise, w)
        return (xn @ w_pad.t())[:, : w.shape[0]]

    @staticmethod
    def backward(ctx, g):
        xn, noise, w = ctx.saved_tensors
        g = g.contiguous()
        gx = torch.mm(g, w).mul_(noise) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g.t(), xn) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def gate_logits(x: torch.Tensor, weight: torch.Tensor, jitter_eps: float = 0.0) -> torch.Tensor:
    """Router logits [N, R + Z + S] = (x * jitter) @ weight^T for x [N, D] (jitter_eps 0: no jitter)."""
    if jitter_eps <= 0:
        return x @ weight.t()
    return _JitteredGate.apply(x, weight, jitter_eps)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; for the router's ~10 columns, elementwise ops beat torch.softmax's
    row-vectorised kernel several times over on CPU (fwd + bwd)."""
    e = (logits - logits.amax(-1, keepdim=True).detach()).exp()  # shift-invariant: no grad through max
    return e / e.sum(-1, keepdim=True)


def top_p_select(probs: torch.Tensor, top_p: float, min_k: int = 1, max_k: int | None = None) -> torch.Tensor:
    """bool [N, E]: the smallest descending prefix of `probs` whose cumulative sum reaches `top_p`."""
    n_exp = probs.shape[-1]
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    if min_k == max_k:
        k = torch.full(probs.shape[:-1], min_k, device=probs.device, dtype=torch.long)
    else:
        # number of entries strictly below the threshold, plus the one that crosses it
        k = (sorted_p.cumsum(-1) < top_p).sum(-1) + 1
        k = k.clamp(min=min_k, max=n_exp if max_k is None else max_k)
    keep_sorted = torch.arange(n_exp, device=probs.device) < k.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def route(logits: torch.Tensor, cfg: MoEConfig) -> Routing:
    """Routing decisions and combine weights from fp32 gate logits [N, R + Z + S]."""
    n_dyn = cfg.num_dynamic_experts
    dyn_logits = logits[:, :n_dyn]
    probs = softmax(dyn_logits)
    with torch.no_grad():
        selected = top_p_select(probs, cfg.top_p, cfg.min_k, cfg.max_k)
    kept = probs * selected
    weights = kept / kept.sum(-1, keepdim=True) if cfg.renormalize else kept
    shared_weights = None
    if cfg.num_shared_experts > 0 and cfg.gate_shared:
        # softmax over {kept dynamic} U {shared}: the dynamic part scales the dynamic weights
        mask = torch.cat([selected, selected.new_ones(selected.shape[0], cfg.num_shared_experts)], dim=-1)
        joint = softmax(logits.masked_fill(~mask, float("-inf")))
        weights = weights * joint[:, :n_dyn].sum(-1, keepdim=True)
        shared_weights = joint[:, n_dyn:]
    return Routing(selected=selected, weights=weights, shared_weights=shared_weights, probs=probs,
                   logits=logits)
