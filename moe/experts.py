"""SwiGLU experts and the grouped expert computation over tokens sorted by expert.

`grouped_swiglu(x, counts, experts)` runs expert i on the contiguous rows
x[sum(counts[:i]) : sum(counts[:i+1])] with one hand-written autograd function: GEMM outputs are
written in place into shared buffers (no per-expert cat), elementwise work runs once over all rows
(fused silu_backward), and every expert's weights get a gradient (zeros for an expert that received no
tokens), so gradient reduction sees the same parameters on every step and every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the same names as the dense FFN so upcycling copies slices."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _per_expert(counts: list[int], fn) -> None:
    """fn(e, offset, count) for every expert with tokens, one after the other; each GEMM uses torch's
    intra-op threads. A pool running experts concurrently with one-thread GEMMs only helped on an
    oversubscribed machine and cost 10-20% on an idle 2-core one (`unimoe bench moe`)."""
    for e, off, c in _slices(counts):
        if c:
            fn(e, off, c)


def _slices(counts: list[int]):
    off = 0
    for e, c in enumerate(counts):
        yield e, off, c
        off += c


class _GroupedSwiGLU(torch.autograd.Function):
    """Per expert only the GEMMs; every elementwise step runs once over all experts' rows.

    gate and up run as one GEMM against [gate; up] (a small weight copy, half the GEMM calls); the
    activations kept for backward are the ones autograd keeps for a dense SwiGLU: h = [h1 | h2],
    s = silu(h1), a = s * h2.
    """

    @staticmethod
    def forward(ctx, x, counts: list[int], *weights):
        # weights = (gate_0, up_0, down_0, gate_1, ...); x [M, D] sorted by expert
        f = weights[0].shape[0]
        h = x.new_empty(x.shape[0], 2 * f)
        wgu = [None] * len(counts)

        def gate_up(e, off, c):
            wgu[e] = torch.cat(weights[3 * e: 3 * e + 2])
            torch.mm(x[off: off + c], wgu[e].t(), out=h[off: off + c])

        _per_expert(counts, gate_up)
        s = F.silu(h[:, :f])
        a = s * h[:, f:]
        y = x.new_empty(x.shape[0], weights[2].shape[0])
        _per_expert(counts,
                    lambda e, off, c: torch.mm(a[off: off + c], weights[3 * e + 2].t(), out=y[off: off + c]))
        ctx.counts = counts
        ctx.wgu = wgu  # [gate; up] per expert, reused by backward (no second copy)
        ctx.save_for_backward(x, h, s, a, *weights)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h, s, a, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        f = weights[0].shape[0]
        gy = gy.contiguous()
        gws = [None] * len(weights)
        ga = gy.new_empty(x.shape[0], f)

        def down_grads(e, off, c):
            torch.mm(gy[off: off + c], weights[3 * e + 2], out=ga[off: off + c])
            if need[4 + 3 * e]:
                gws[3 * e + 2] = torch.mm(gy[off: off + c].t(), a[off: off + c])  # [D, F]

        _per_expert(ctx.counts, down_grads)
        gh = torch.empty_like(h)  # [d h1 | d h2]
        torch.mul(ga, s, out=gh[:, f:])
        torch.ops.aten.silu_backward.grad_input(ga.mul_(h[:, f:]), h[:, :f], grad_input=gh[:, :f])
        gx = torch.empty_like(x) if need[0] else None

        def gate_up_grads(e, off, c):
            if need[2 + 3 * e] or need[3 + 3 * e]:
                gwgu = torch.mm(gh[off: off + c].t(), x[off: off + c])  # [2F, D]
                gws[3 * e], gws[3 * e + 1] = gwgu[:f], gwgu[f:]
            if gx is not None:
                torch.mm(gh[off: off + c], ctx.wgu[e], out=gx[off: off + c])

        _per_expert(ctx.counts, gate_up_grads)
        ctx.wgu = None
        # an expert without tokens still gets a (zero) gradient: same reduction on every rank and step
        gws = [torch.zeros_like(w) if g is None and need[2 + i] else g
               for i, (w, g) in enumerate(zip(weights, gws))]
        return (gx, None, *gws)


def grouped_swiglu(x: torch.Tensor, counts: list[int], experts: list[SwiGLU]) -> torch.Tensor:
    """Apply experts[i] to its contiguous slice of x ([M, D], rows sorted by expert); returns [M, D]."""
    assert len(counts) == len(experts) and sum(counts) == x.shape[0], (counts, x.shape)
    weights = []
    for ex in experts:
        weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
    return _GroupedSwiGLU.apply(x, list(counts), *weights)
