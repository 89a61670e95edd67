"""Dropless token permutation and the expert-parallel token exchange.

`permute`: the (token, routed expert) pairs sorted by expert, tokens in order within an expert; no
capacity, nothing dropped, null experts never appear. `unpermute`: each pair's output times its combine
weight, added onto the token's row (on the token's home rank), in fp32. `all_to_all`: the differentiable
uneven all-to-all of expert parallelism (its backward is the reverse exchange); `segment_perm`: received rows,
laid out by source rank, to the order of the local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def permute(selected_TR: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids [M], expert_ids [M]) of the kept (token, expert) pairs, sorted by expert. num_pairs (M,
    known on the host) gives the output its size without a device-to-host sync (on CUDA: torch >= 2.6)."""
    # (expert, token) index pairs of the transposed mask, in row-major order: sorted by expert, stable
    expert_ids, token_ids = torch.nonzero_static(selected_TR.t(), size=num_pairs).unbind(1)
    return token_ids, expert_ids


def unpermute(out_TD: torch.Tensor, y_MD: torch.Tensor, token_ids: torch.Tensor, w_M: torch.Tensor):
    """out + (w[p] * y[p] added onto row token_ids[p]), in out's dtype. The weights (fp32 from the router),
    products and sums are fp32 whatever the experts' dtype, cast once at the end: bf16 products and a bf16
    index_add_ round every pair and every partial sum (and the router's gradient through them)."""
    acc = out_TD.float().index_add_(0, token_ids, y_MD.float() * w_M.float().unsqueeze(-1))
    return acc.to(out_TD.dtype)


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group):
        ctx.args = (send_splits, recv_splits, group)
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, g):
        send_splits, recv_splits, group = ctx.args
        return _exchange(g, recv_splits, send_splits, group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Rows of x split by send_splits go to ranks 0..n-1 of group; returns the rows received, by source."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [n * L] (my tokens for each expert of each rank) -> [n * L] (each rank's tokens for my
    experts, by source rank then local expert)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


def segment_perm(counts_NL: torch.Tensor, total: int) -> torch.Tensor:
    """Rows laid out source-major (counts [n, L] of them: rank s's rows for local expert l) -> the indices
    that lay them out expert-major. total = counts.sum(), from the host (no sync for the output size)."""
    lengths = counts_NL.t().reshape(-1)  # expert-major order of the segments
    starts = (counts_NL.reshape(-1).cumsum(0) - counts_NL.reshape(-1)).view(counts_NL.shape).t().reshape(-1)
    seg_first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths, output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + (
        torch.arange(total, device=counts_NL.device) - seg_first)
