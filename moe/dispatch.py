"""Dropless token permutation and the expert-parallel token exchange.

`Plan`: the (token, expert) pairs sorted by expert (no sort kernel), with per-expert counts. Local (EP=1),
moe.experts.grouped_swiglu fuses the permutation with the experts: each piece of an expert's pairs
gathers its tokens' rows, runs, and scatter-adds its weighted output onto the shared experts' output;
no per-token Python, no capacity, no [pairs, D] copies.

Expert parallel (EP=n): rank r holds the routed experts [r*L, (r+1)*L). Sorted by global expert, the
pairs are already grouped by destination rank. 1) per-expert counts are exchanged (all-to-all of
[n, L] counts), 2) the tokens travel, gathered into pair order (`gather`), with their combine weights
(all-to-all, uneven splits), 3) each local expert's pairs read the received rows through the
permutation (source rank, local expert) -> (local expert, source rank) and write their outputs back to
the same rows, 4) the reverse all-to-all brings them home, where `scatter_add` (on CPU a sparse CSR
matmul, on GPU index_add_) adds them onto the shared experts' output. Null-routed tokens are never in
the pair list, so they never travel. `exchange` is differentiable (its backward is the reverse
exchange) and has two transports: `all_to_all_single` (NCCL, and gloo in recent torch) and point-to-point
isend/irecv (any backend; the default on gloo).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist

# torch warns once that CSR is "beta" and that invariant checks are off; our CSR is built correct.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class Plan:
    """Where each routed (token, expert) pair goes: pairs sorted by expert (stable in token order).

    expert_ids, token_ids [M]; counts [R]. For the way back on CPU, a 0/1 CSR matrix [N, M] (row t holds
    the expert-sorted positions of token t's pairs) turns the scatter-add into one sparse-dense matmul
    that accumulates into a given output (no zero fill, no separate add); on GPU index_add_ (atomics).
    """

    def __init__(self, selected: torch.Tensor, num_experts: int):
        sel = selected[:, :num_experts]
        self.n_tokens = sel.shape[0]
        # nonzero of the transposed mask enumerates (expert, token) in row-major order: sorted by expert,
        # tokens in order within an expert, no sort kernel needed.
        self.expert_ids, self.token_ids = sel.t().nonzero(as_tuple=True)
        self.counts = torch.bincount(self.expert_ids, minlength=num_experts)
        self._selected = sel

    @functools.cached_property
    def csr(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(crow, col) of the 0/1 [N, M] matrix of token t's pair positions (CPU only; built on first use)."""
        sel = self._selected
        if sel.device.type != "cpu":
            return None
        idx = torch.int32 if self.token_ids.numel() < 2 ** 31 else torch.int64
        offsets = self.counts.cumsum(0) - self.counts
        pos = sel.to(idx).cumsum(0) - 1 + offsets.to(idx)  # expert-sorted position of pair (t, e)
        crow = torch.zeros(self.n_tokens + 1, dtype=idx, device=sel.device)
        crow[1:] = sel.sum(1).cumsum(0)
        return crow, pos[sel]  # col in token-major order

    def combine(self, y: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = base[t] + sum of y over token t's pairs (base None: 0); out [N, D]. A given base is
        accumulated into in place and returned."""
        if self.csr is not None and y.dtype in (torch.float32, torch.float64):
            crow, col = self.csr
            mat = torch.sparse_csr_tensor(crow, col, torch.ones_like(col, dtype=y.dtype),
                                          (self.n_tokens, y.shape[0]))
            return mat @ y if base is None else base.addmm_(mat, y)
        out = y.new_zeros(self.n_tokens, y.shape[1]) if base is None else base
        return out.index_add_(0, self.token_ids, y)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: Plan):
        ctx.plan = plan
        return x.index_select(0, plan.token_ids)

    @staticmethod
    def backward(ctx, g):
        return ctx.plan.combine(g.contiguous()), None


class _ScatterAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, base, plan: Plan):
        ctx.plan = plan
        if base is not None:
            ctx.mark_dirty(base)
        return plan.combine(y, base)

    @staticmethod
    def backward(ctx, g):
        gy = g.index_select(0, ctx.plan.token_ids) if ctx.needs_input_grad[0] else None
        return gy, g if ctx.needs_input_grad[1] else None, None


def gather(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """x [N, D] -> the rows of the routed pairs in expert order [M, D]."""
    return _Gather.apply(x, plan)


def scatter_add(y: torch.Tensor, plan: Plan, base: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, D] in expert order -> out [N, D] = base + sum of y over each token's pairs. base (optional,
    e.g. the shared experts' output) is accumulated into in place: no separate add."""
    return _ScatterAdd.apply(y, base, plan)


def resolve_exchange(method: str, group) -> str:
    if method != "auto":
        return method
    return "p2p" if dist.get_backend(group) == "gloo" else "all_to_all"


def _exchange_raw(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, method: str):
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    x = x.contiguous()
    if method == "all_to_all":
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
        return out
    rank = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    ins, outs = x.split(send_splits), out.split(recv_splits)
    outs[rank].copy_(ins[rank])
    reqs = []
    for peer, global_peer in enumerate(ranks):
        if peer == rank:
            continue
        if send_splits[peer] > 0:
            reqs.append(dist.isend(ins[peer], dst=global_peer, group=group))
        if recv_splits[peer] > 0:
            reqs.append(dist.irecv(outs[peer], src=global_peer, group=group))
    for req in reqs:
        req.wait()
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, method):
        ctx.args = (send_splits, recv_splits, group, method)
        return _exchange_raw(x, send_splits, recv_splits, group, method)

    @staticmethod
    def backward(ctx, g):
        send_splits, recv_splits, group, method = ctx.args
        return _exchange_raw(g, recv_splits, send_splits, group, method), None, None, None, None


def exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, method: str):
    """Differentiable uneven all-to-all along dim 0: rows split by send_splits go to ranks 0..n-1."""
    return _Exchange.apply(x, send_splits, recv_splits, group, method)


def exchange_counts(counts: torch.Tensor, group, method: str) -> torch.Tensor:
    """counts [n * L] (tokens for each expert of each rank) -> [n * L] (from each rank, for my experts)."""
    n = dist.get_world_size(group)
    split = [counts.numel() // n] * n
    return _exchange_raw(counts, split, split, group, method)


def segment_perm(counts: torch.Tensor) -> torch.Tensor:
    """counts [n, L] of rows laid out source-major -> indices that lay them out expert-major."""
    lengths = counts.t().reshape(-1)
    starts = (counts.reshape(-1).cumsum(0) - counts.reshape(-1)).view(counts.shape).t().reshape(-1)
    total = int(lengths.sum())
    seg_first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths, output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + (
        torch.arange(total, device=counts.device) - seg_first)
