"""SwiGLU experts and the grouped expert computation over tokens sorted by expert.

`grouped_swiglu(x, counts, experts)` runs expert i on the contiguous rows
x[sum(counts[:i]) : sum(counts[:i+1])] with one hand-written autograd function: outputs are written in
place into one buffer (no per-expert cat), the backward recomputes nothing but the SwiGLU activation,
and every expert's weights get a gradient (zeros for an expert that received no tokens), so gradient
reduction sees the same parameters on every step and every rank.
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


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts: list[int], *weights):
        # weights = (gate_0, up_0, down_0, gate_1, ...); x [M, D] sorted by expert
        y = x.new_empty(x.shape[0], weights[2].shape[0] if weights else x.shape[1])
        hs = []
        off = 0
        for e, c in enumerate(counts):
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            if c == 0:
                hs.append((None, None))
                continue
            xe = x[off: off + c]
            h1 = torch.mm(xe, wg.t())
            h2 = torch.mm(xe, wu.t())
            torch.mm(F.silu(h1) * h2, wd.t(), out=y[off: off + c])
            hs.append((h1, h2))
            off += c
        ctx.counts = counts
        ctx.hs = hs
        ctx.save_for_backward(x, *weights)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, *weights = ctx.saved_tensors
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gws = []
        off = 0
        gy = gy.contiguous()
        for e, c in enumerate(ctx.counts):
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            if c == 0:
                gws += [torch.zeros_like(wg), torch.zeros_like(wu), torch.zeros_like(wd)]
                continue
            h1, h2 = ctx.hs[e]
            xe, ge = x[off: off + c], gy[off: off + c]
            sig = torch.sigmoid(h1)
            silu = h1 * sig
            gd = torch.mm(ge.t(), silu * h2)  # [D, F]
            ga = torch.mm(ge, wd)  # [c, F]
            g2 = ga * silu
            # d silu / d h1 = sig * (1 + h1 * (1 - sig))
            g1 = ga.mul_(h2).mul_(sig.mul_(1.0 + h1 * (1.0 - sig)))
            gws += [torch.mm(g1.t(), xe), torch.mm(g2.t(), xe), gd]
            if gx is not None:
                ge_x = gx[off: off + c]
                torch.mm(g1, wg, out=ge_x)
                ge_x.addmm_(g2, wu)
            off += c
        ctx.hs = None
        return (gx, None, *gws)


def grouped_swiglu(x: torch.Tensor, counts: list[int], experts: list[SwiGLU]) -> torch.Tensor:
    """Apply experts[i] to its contiguous slice of x ([M, D], rows sorted by expert); returns [M, D]."""
    assert len(counts) == len(experts) and sum(counts) == x.shape[0], (counts, x.shape)
    weights = []
    for ex in experts:
        weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
    return _GroupedSwiGLU.apply(x, list(counts), *weights)
