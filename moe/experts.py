"""SwiGLU experts and the grouped expert computation, fused with the token permutation.

`grouped_swiglu(x, counts, experts, index, row_weights, base)`: pair p (pairs sorted by expert, counts[i]
of them for expert i) reads row index[p] of x, goes through its expert, is scaled by row_weights[p] and
added to row index[p] of the output (base, or zeros). One hand-written autograd function, piece by piece
(an expert's pairs, on CPU at most CHUNK_ROWS at a time): gather the piece's rows, its GEMMs with the
elementwise work between them while the piece is in cache, scatter-add its output; backward the same
way round. No [pairs, D] copy of the tokens, their outputs or their gradients is ever materialised, and
every expert's weights get a gradient (zeros for an expert that received no tokens), so gradient
reduction sees the same parameters on every step and every rank.

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


CHUNK_ROWS = 2048  # CPU: rows per piece, so a piece's activations stay in (L3) cache between its GEMMs


def _piece_rows(x: torch.Tensor, m: int) -> int:
    """Rows per piece: CHUNK_ROWS on CPU; on GPU an expert's m pairs are one piece (fewer, larger GEMMs)."""
    return CHUNK_ROWS if x.device.type == "cpu" else max(m, 1)


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


class _Rows:
    """A piece's rows of an [N, D] tensor: pairs `rows` read and add to rows index[rows] (index None:
    the pairs are the rows themselves, read as views and written in place)."""

    def __init__(self, index: torch.Tensor | None, rows: slice):
        self.index = None if index is None else index[rows]
        self.rows = rows

    def read(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rows] if self.index is None else t.index_select(0, self.index)

    def add_products(self, out: torch.Tensor, products, overwrite: bool = False) -> None:
        """out[rows] (+)= sum of a @ b over products [(a, b), ...]."""
        (a, b), rest = products[0], products[1:]
        if self.index is None:
            dst = out[self.rows]
            torch.mm(a, b, out=dst) if overwrite else dst.addmm_(a, b)
        else:
            dst = torch.mm(a, b)
        for a, b in rest:
            dst.addmm_(a, b)
        if self.index is not None:
            out.index_add_(0, self.index, dst)


class _GroupedSwiGLU(torch.autograd.Function):
    """Saved for backward: x, index, h1 = x Wg^T and h2 = x Wu^T per pair (less than autograd keeps for
    a dense SwiGLU); silu(h1) and the down projection's input a = silu(h1) * h2 (* g) are recomputed per
    piece in backward, in cache, into per-call scratch buffers. Gates g [M, B] scale block b of the
    hidden width by g[:, b] (B = 1: the combine weights; B gated SwiGLUs concatenated along F: the
    shared experts)."""

    @staticmethod
    def forward(ctx, x, index, counts: list[int], gates, base, *weights):
        # weights = (gate_0, up_0, down_0, gate_1, ...)
        m, f, d = sum(counts), weights[0].shape[0], weights[2].shape[0]
        h1, h2 = x.new_empty(m, f), x.new_empty(m, f)
        fresh = base is None and index is None  # output rows written exactly once, in pair order
        out = base if base is not None else (x.new_empty(m, d) if fresh else x.new_zeros(x.shape[0], d))
        piece = _piece_rows(x, m)
        scratch = x.new_empty(min(m, piece), f)
        for e, rows in _pieces(counts, piece):
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            at = _Rows(index, rows)
            xe = at.read(x)
            torch.mm(xe, wg.t(), out=h1[rows])
            torch.mm(xe, wu.t(), out=h2[rows])
            a = _gated_activation(h1[rows], h2[rows], None if gates is None else gates[rows],
                                  scratch[: rows.stop - rows.start])
            at.add_products(out, [(a, wd.t())], overwrite=fresh)
        if base is not None:
            ctx.mark_dirty(base)
        ctx.counts = counts
        ctx.save_for_backward(x, index, h1, h2, gates, *weights)
        return out

    @staticmethod
    def backward(ctx, g):
        x, index, h1, h2, gates, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        gws = [None] * len(weights)
        gx = None
        if need[0]:
            gx = torch.zeros_like(x) if index is not None else torch.empty_like(x)
        g_gates = gates.new_empty(gates.shape) if gates is not None and need[3] else None
        piece, f = _piece_rows(x, h1.shape[0]), h1.shape[1]
        ga_buf, s_buf, t_buf = (x.new_empty(min(h1.shape[0], piece), f) for _ in range(3))
        for e, rows in _pieces(ctx.counts, piece):
            n = rows.stop - rows.start
            wg, wu, wd = weights[3 * e: 3 * e + 3]
            at = _Rows(index, rows)
            xe, gye, h1e, h2e = at.read(x), at.read(g), h1[rows], h2[rows]
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
            if need[7 + 3 * e]:
                _accumulate(gws, 3 * e + 2, gye.t(), t)  # [D, F]
            gh2 = torch.mul(ga, s, out=t)
            gh1 = torch.ops.aten.silu_backward.grad_input(ga.mul_(h2e), h1e, grad_input=ga)
            if need[5 + 3 * e]:
                _accumulate(gws, 3 * e, gh1.t(), xe)
            if need[6 + 3 * e]:
                _accumulate(gws, 3 * e + 1, gh2.t(), xe)
            if gx is not None:
                at.add_products(gx, [(gh1, wg), (gh2, wu)], overwrite=index is None)
        # an expert without tokens still gets a (zero) gradient: same reduction on every rank and step
        gws = [torch.zeros_like(w) if gw is None and need[5 + i] else gw
               for i, (w, gw) in enumerate(zip(weights, gws))]
        return (gx, None, None, g_gates, g if need[4] else None, *gws)


def _gated_activation(h1, h2, gates, out):
    """out = silu(h1) * h2, block b of the width scaled by gates[:, b] (gates None: unscaled)."""
    torch.ops.aten.silu.out(h1, out=out)
    out.mul_(h2)
    if gates is not None:
        _blocks(out, gates.shape[1]).mul_(gates.unsqueeze(-1))
    return out


def grouped_swiglu(x: torch.Tensor, counts: list[int], experts: list[SwiGLU],
                   index: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                   base: torch.Tensor | None = None) -> torch.Tensor:
    """out[index[p]] += row_weights[p] * experts[i](x[index[p]]) for the counts[i] pairs p of expert i
    (pairs sorted by expert); out = base (accumulated into in place) or zeros, [len(x), D].
    index None: x is already in pair order ([sum(counts), D]) and so is the output."""
    assert len(counts) == len(experts), (len(counts), len(experts))
    assert sum(counts) == (x.shape[0] if index is None else index.numel()), (counts, x.shape)
    weights = []
    for ex in experts:
        weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
    gates = None if row_weights is None else row_weights.to(x.dtype).unsqueeze(1)
    return _GroupedSwiGLU.apply(x, index, list(counts), gates, base, *weights)


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
           block_gates: torch.Tensor | None = None) -> torch.Tensor:
    """down_w (silu(x gate_w^T) * (x up_w^T) * g) for x [N, D]; block_gates [N, B] (or None: g = 1) scales
    block b of the hidden width (F / B columns) by g[:, b]: B gated SwiGLUs concatenated along F."""
    if block_gates is not None:
        assert gate_w.shape[0] % block_gates.shape[1] == 0, (gate_w.shape, block_gates.shape)
        block_gates = block_gates.to(x.dtype).contiguous()
    return _GroupedSwiGLU.apply(x, None, [x.shape[0]], block_gates, None, gate_w, up_w, down_w)
