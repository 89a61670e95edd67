"""Dropless token permutation and the expert-parallel token exchange.

Local (EP=1):  (token, expert) pairs sorted by expert -> one gather x[token_ids] -> experts on contiguous
slices -> one weighted scatter-add back (`weighted_scatter`, custom autograd, no extra copies).

Expert parallel (EP=n): rank r holds the routed experts [r*L, (r+1)*L). Sorted by global expert, the
pairs are already grouped by destination rank. 1) per-expert counts are exchanged (all-to-all of
[n, L] counts), 2) the tokens travel (all-to-all, uneven splits), 3) received rows are reordered from
(source rank, local expert) to (local expert, source rank) so each local expert sees one contiguous
slice, 4) the way back is the inverse permutation and the reverse all-to-all. Null-routed tokens are
never in the pair list, so they never travel. `exchange` is differentiable (its backward is the reverse
exchange) and has two transports: `all_to_all_single` (NCCL, and gloo in recent torch) and point-to-point
isend/irecv (any backend; the default on gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sort_by_expert(selected: torch.Tensor, num_experts: int):
    """selected bool [N, R] -> (expert_ids [M], token_ids [M], counts [R]) with pairs sorted by expert."""
    # nonzero of the transposed mask enumerates (expert, token) in row-major order: sorted by expert,
    # tokens in order within an expert (stable), no sort kernel needed.
    expert_ids, token_ids = selected[:, :num_experts].t().nonzero(as_tuple=True)
    counts = torch.bincount(expert_ids, minlength=num_experts)
    return expert_ids, token_ids, counts


class _WeightedScatter(torch.autograd.Function):
    """out[t] = sum over pairs p with token_ids[p] == t of w[p] * y[p]; out has n rows."""

    @staticmethod
    def forward(ctx, y, w, token_ids, n: int):
        out = y.new_zeros(n, y.shape[1])
        out.index_add_(0, token_ids, y * w.unsqueeze(1).to(y.dtype))
        ctx.save_for_backward(y, w, token_ids)
        return out

    @staticmethod
    def backward(ctx, g):
        y, w, token_ids = ctx.saved_tensors
        g_sorted = g.index_select(0, token_ids)
        gw = (g_sorted * y).sum(1, dtype=torch.float32).to(w.dtype) if ctx.needs_input_grad[1] else None
        gy = g_sorted.mul_(w.unsqueeze(1).to(g.dtype)) if ctx.needs_input_grad[0] else None
        return gy, gw, None, None


def weighted_scatter(y: torch.Tensor, w: torch.Tensor, token_ids: torch.Tensor, n: int) -> torch.Tensor:
    return _WeightedScatter.apply(y, w, token_ids, n)


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
