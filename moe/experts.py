"""SwiGLU experts and the grouped expert computation over tokens sorted by expert.

`grouped_swiglu(x, counts, experts, row_weights)` runs expert i on the contiguous rows
x[sum(counts[:i]) : sum(counts[:i+1])] and scales each output row by its combine weight, in one
hand-written autograd function: GEMMs write into shared buffers (no per-expert cat), the elementwise
work of each piece of rows runs between its GEMMs while it is in cache, and every expert's weights get
a gradient (zeros for an expert that received no tokens), so gradient reduction sees the same
parameters on every step and every rank.

`swiglu(x, gate_w, up_w, down_w, block_gates)` is the same function for one wide SwiGLU over all rows,
with optional per-row gates on blocks of its hidden width: the shared experts, concatenated.
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


CHUNK_ROWS = 1024  # CPU: rows per piece, so a piece's activations stay in cache between its GEMMs


def _piece_rows(x: torch.Tensor) -> int:
    """Rows per piece: CHUNK_ROWS on CPU; on GPU an expert's rows are one piece (fewer, larger GEMMs)."""
    return CHUNK_ROWS if x.device.type == "cpu" else max(x.shape[0], 1)


def _pieces(counts: list[int], max_rows: int):
    """(expert, rows) for each expert's contiguous rows, in pieces of at most max_rows, one after the
    other; each GEMM uses torch's intra-op threads. A pool running experts concurrently with one-thread
    GEMMs only helped on an oversubscribed machine and cost 10-20% on an idle 2-core one."""
    off = 0
    for e, c in enumerate(counts):
        for r0 in range(off, off + c, max_rows):
            yield e, slice(r0, min(r0 + max_rows, off + c))
        off += c


def _blocks(t: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[M, F] -> [M, n_blocks, F / n_blocks] view."""
    return t.view(t.shape[0], n_blocks, -1)


def _accumulate(grads: list, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """grads[i] += a @ b (the first piece of an expert allocates it)."""
    if grads[i] is None:
        grads[i] = torch.mm(a, b)
    else:
        grads[i].addmm_(a, b)


class _GroupedSwiGLU(torch.autograd.Function):
    """Piece by piece (an expert's rows, on CPU at most CHUNK_ROWS at a time): the GEMMs, and between
    them the elementwise work on that piece while it is still in cache (after all GEMMs, every
    elementwise op would stream all rows through memory once more).

    Saved for backward: x, h1 = x Wg^T and h2 = x Wu^T, less than autograd keeps for a dense SwiGLU;
    silu(h1) and the down projection's input a = silu(h1) * h2 (* g) are recomputed per piece in
    backward, in cache, into per-call scratch buffers. Block gates g [M, B] scale block b of the hidden
    width by g[:, b] (B gated SwiGLUs concatenated along F: the shared experts).
    """

    @staticmethod
    def forward(ctx, x, counts: list[int], gates, *weights):
        # weights = (gate_0, up_0, down_0, gate_1, ...); x [M, D] sorted by expert
        m, f = x.shape[0], weights[0].shape[0]
        h1, h2 = x.new_empty(m, f), x.new_empty(m, f)
        y = x.new_empty(m, weights[2].shape[0])
        piece = _piece_rows(x)
        scratch = x.new_empty(min(m, piece), f)
        for e, rows in _pieces(counts, piece):
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            torch.mm(x[rows], wg.t(), out=h1[rows])
            torch.mm(x[rows], wu.t(), out=h2[rows])
            a = _gated_activation(h1[rows], h2[rows], None if gates is None else gates[rows],
                                  scratch[: rows.stop - rows.start])
            torch.mm(a, wd.t(), out=y[rows])
        ctx.counts = counts
        ctx.save_for_backward(x, h1, h2, gates, *weights)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h1, h2, gates, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        gy = gy.contiguous()
        gws = [None] * len(weights)
        gx = torch.empty_like(x) if need[0] else None
        g_gates = gates.new_empty(gates.shape) if gates is not None and need[2] else None
        piece, f = _piece_rows(x), h1.shape[1]
        ga_buf, s_buf, t_buf = (x.new_empty(min(x.shape[0], piece), f) for _ in range(3))
        for e, rows in _pieces(ctx.counts, piece):
            n = rows.stop - rows.start
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            xe, h1e, h2e, gye = x[rows], h1[rows], h2[rows], gy[rows]
            ga, s, t = ga_buf[:n], s_buf[:n], t_buf[:n]
            torch.mm(gye, wd, out=ga)  # d(down input)
            torch.ops.aten.silu.out(h1e, out=s)
            torch.mul(s, h2e, out=t)  # a (ungated)
            if gates is not None:
                ge = gates[rows].unsqueeze(-1)
                if g_gates is not None:
                    torch.linalg.vecdot(_blocks(ga, ge.shape[1]), _blocks(t, ge.shape[1]), out=g_gates[rows])
                _blocks(t, ge.shape[1]).mul_(ge)  # t = down input
                _blocks(ga, ge.shape[1]).mul_(ge)  # ga = d a
            if need[5 + 3 * e]:
                _accumulate(gws, 3 * e + 2, gye.t(), t)  # [D, F]
            gh2 = torch.mul(ga, s, out=t)
            gh1 = torch.ops.aten.silu_backward.grad_input(ga.mul_(h2e), h1e, grad_input=ga)
            if need[3 + 3 * e]:
                _accumulate(gws, 3 * e, gh1.t(), xe)
            if need[4 + 3 * e]:
                _accumulate(gws, 3 * e + 1, gh2.t(), xe)
            if gx is not None:
                torch.mm(gh1, wg, out=gx[rows]).addmm_(gh2, wu)
        # an expert without tokens still gets a (zero) gradient: same reduction on every rank and step
        gws = [torch.zeros_like(w) if g is None and need[3 + i] else g
               for i, (w, g) in enumerate(zip(weights, gws))]
        return (gx, None, g_gates, *gws)


def _gated_activation(h1, h2, gates, out):
    """out = silu(h1) * h2, block b of the width scaled by gates[:, b] (gates None: unscaled)."""
    torch.ops.aten.silu.out(h1, out=out)
    out.mul_(h2)
    if gates is not None:
        _blocks(out, gates.shape[1]).mul_(gates.unsqueeze(-1))
    return out


def grouped_swiglu(x: torch.Tensor, counts: list[int], experts: list[SwiGLU],
                   row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Apply experts[i] to its contiguous slice of x ([M, D], rows sorted by expert); returns [M, D], row
    m scaled by row_weights[m] when given (the combine weights: scaled in cache, piece by piece)."""
    assert len(counts) == len(experts) and sum(counts) == x.shape[0], (counts, x.shape)
    weights = []
    for ex in experts:
        weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
    gates = None if row_weights is None else row_weights.to(x.dtype).unsqueeze(1)
    return _GroupedSwiGLU.apply(x, list(counts), gates, *weights)


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
           block_gates: torch.Tensor | None = None) -> torch.Tensor:
    """down_w (silu(x gate_w^T) * (x up_w^T) * g) for x [N, D]; block_gates [N, B] (or None: g = 1) scales
    block b of the hidden width (F / B columns) by g[:, b]: B gated SwiGLUs concatenated along F."""
    if block_gates is not None:
        assert gate_w.shape[0] % block_gates.shape[1] == 0, (gate_w.shape, block_gates.shape)
        block_gates = block_gates.to(x.dtype).contiguous()
    return _GroupedSwiGLU.apply(x, [x.shape[0]], block_gates, gate_w, up_w, down_w)
