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
        saved = []  # per expert: the same activations autograd would keep for a dense SwiGLU
        off = 0
        for e, c in enumerate(counts):
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            if c == 0:
                saved.append(None)
                continue
            xe = x[off: off + c]
            h1 = torch.mm(xe, wg.t())
            h2 = torch.mm(xe, wu.t())
            s = F.silu(h1)
            a = s * h2
            torch.mm(a, wd.t(), out=y[off: off + c])
            saved.append((h1, h2, s, a))
            off += c
        ctx.counts = counts
        ctx.acts = saved
        ctx.save_for_backward(x, *weights)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = torch.empty_like(x) if need[0] else None
        gws = []
        off = 0
        gy = gy.contiguous()
        for e, c in enumerate(ctx.counts):
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            need_w = need[2 + 3 * e: 5 + 3 * e]
            if c == 0:
                gws += [torch.zeros_like(w) if n else None for w, n in zip((wg, wu, wd), need_w)]
                continue
            h1, h2, s, a = ctx.acts[e]
            xe, ge = x[off: off + c], gy[off: off + c]
            gd = torch.mm(ge.t(), a) if need_w[2] else None  # [D, F]
            ga = torch.mm(ge, wd)  # [c, F]
            g2 = ga * s
            g1 = torch.ops.aten.silu_backward(ga.mul_(h2), h1)
            gws += [torch.mm(g1.t(), xe) if need_w[0] else None, torch.mm(g2.t(), xe) if need_w[1] else None,
                    gd]
            if gx is not None:
                ge_x = gx[off: off + c]
                torch.mm(g1, wg, out=ge_x)
                ge_x.addmm_(g2, wu)
            off += c
        ctx.acts = None
        return (gx, None, *gws)


def grouped_swiglu(x: torch.Tensor, counts: list[int], experts: list[SwiGLU]) -> torch.Tensor:
    """Apply experts[i] to its contiguous slice of x ([M, D], rows sorted by expert); returns [M, D]."""
    assert len(counts) == len(experts) and sum(counts) == x.shape[0], (counts, x.shape)
    weights = []
    for ex in experts:
        weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
    return _GroupedSwiGLU.apply(x, list(counts), *weights)
