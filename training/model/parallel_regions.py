"""The borders of the tensor-parallel regions: what crosses them, forward and backward (Megatron's mappings).

The model (training.model.lm) calls four functions of a regions object; on one rank they do nothing
(training.model.lm.LocalRegions):

    x = regions.scatter(embeddings)     # after the embeddings
    h = regions.enter(x)                # before column-parallel layers (qkv, FFN gate/up, output heads)
    x = regions.exit(y)                 # after row-parallel layers (attention out, FFN down): partial sums
    y = regions.replicated(block, ...)  # a block whose replicated weights (norms, MoE) see local tokens

                       scatter                    enter                       exit
    tensor parallel    identity                   fwd identity, bwd all-reduce  fwd all-reduce, bwd identity
    + sequence par.    fwd split, bwd all-gather  fwd all-gather, bwd           fwd reduce-scatter, bwd
                                                  reduce-scatter                all-gather

Sequence parallelism (Korthikanti et al. 2022) splits the tokens of a step over the TP group between the
column/row pairs: each rank's norms and MoE layers see 1/TP of the tokens (flattened [B*L] order, padded
with zero rows to a multiple of TP; padded tokens carry task id -1, so the MoE losses ignore them), and the
expert-parallel all-to-all carries each token once per TP group. The all-gather + reduce-scatter pair
moves the same bytes as the all-reduce it replaces. Replicated parameters (all but the TP shards, which
carry megatron-core's `tensor_model_parallel` attribute) used on the split tokens get only this rank's
share of their gradient: `replicated(block, ...)` runs a transformer block on its replicated parameters
passed through an identity whose backward sums all their gradients over the TP group in one all-reduce
(per block and micro-batch, once the block's backward is done), before autograd accumulates them into
.grad, where DeepSpeed's hooks reduce them over data parallelism.

megatron-core's own sequence-parallel mappings allocate on `torch.cuda.current_device()` (they fail on a
CPU build), so the token functions below are ours, with the same semantics (all_gather_into_tensor /
reduce_scatter_tensor: NCCL, and gloo in recent torch); the two plain TP mappings are megatron-core's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (same arguments)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * dist.get_world_size(group),) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group),) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _my_rows(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group))[dist.get_rank(group)].contiguous()


class _RowCollective(torch.autograd.Function):
    """A row collective forward, its adjoint backward (split / all-gather, all-gather / reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.adjoint = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, g):
        return ctx.adjoint(g, ctx.group), None, None, None


def split_rows(x, group):
    return _RowCollective.apply(x, group, _my_rows, _all_gather_rows)


def gather_rows(x, group):
    return _RowCollective.apply(x, group, _all_gather_rows, _reduce_scatter_rows)


def reduce_scatter_rows(x, group):
    return _RowCollective.apply(x, group, _reduce_scatter_rows, _all_gather_rows)


class _SumGradsOverGroup(torch.autograd.Function):
    """Identity on a module's parameters; backward all-reduces their gradients (one flat buffer per dtype)."""

    @staticmethod
    def forward(ctx, group, *params):
        ctx.group = group
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        out = list(grads)
        for dtype in dict.fromkeys(g.dtype for g in grads):  # parameter order: the same on every rank
            idx = [i for i, g in enumerate(grads) if g.dtype == dtype]
            flat = torch.cat([grads[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, group=ctx.group)
            for i, part in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = part.view_as(grads[i])
        return (None, *out)


class TensorParallelRegions:
    """Borders for a TP group; `begin` gives the object for one forward call (its token count). Sequence
    parallelism applies to calls without a KV cache (training, scoring); cached decoding is plain TP."""

    def __init__(self, group, sequence_parallel: bool, shape: tuple[int, int] | None = None,
                 defer_expert_grads: bool = False):
        self.group = group
        self.size = dist.get_world_size(group)
        self.sequence_parallel = sequence_parallel
        self.shape = shape  # (B, L) of this call when its tokens are split
        self.token_group = group if shape is not None else None
        # routed experts left out of replicated()'s sum: the trainer's engine sums them once per step
        # (moe/expert_grads.py)
        self.defer_expert_grads = defer_expert_grads

    def begin(self, batch: int, length: int, cache=None) -> TensorParallelRegions:
        split = self.sequence_parallel and cache is None
        return TensorParallelRegions(self.group, self.sequence_parallel, (batch, length) if split else None,
                                     self.defer_expert_grads)

    def _rows(self, t, value=0):
        """t [B, L, ...] as B*L rows, padded with `value` to a multiple of TP (a view when none is needed)."""
        rows = t.reshape(self.shape[0] * self.shape[1], *t.shape[2:])
        pad = -rows.shape[0] % self.size
        if not pad:
            return rows
        return torch.cat([rows, rows.new_full((pad, *rows.shape[1:]), value)])

    def scatter(self, x):
        """[B, L, D] (identical on the TP ranks) -> this rank's [ceil(B*L / TP), D] rows."""
        if self.shape is None:
            return x
        return split_rows(self._rows(x), self.group)

    def scatter_ids(self, ids):
        if self.shape is None or ids is None:
            return ids
        return _my_rows(self._rows(ids, value=-1), self.group)

    def enter(self, x):
        if self.shape is None:
            return copy_to_tensor_model_parallel_region(x, group=self.group)
        B, L = self.shape
        return gather_rows(x, self.group)[: B * L].view(B, L, -1)

    def exit(self, y):
        if self.shape is None:
            return reduce_from_tensor_model_parallel_region(y, group=self.group)
        return reduce_scatter_rows(self._rows(y), self.group)

    def replicated(self, module, *args, **kwargs):
        """module(*args, **kwargs); on split tokens the gradients of its replicated parameters are summed
        over the group."""
        if self.shape is None:
            return module(*args, **kwargs)
        named = [(n, p) for n, p in module.named_parameters()
                 if p.requires_grad and not getattr(p, "tensor_model_parallel", False)
                 and not (self.defer_expert_grads and is_moe_param(p))]
        if not named:
            return module(*args, **kwargs)
        if any(hasattr(p, "ds_id") for _, p in named):
            raise RuntimeError("sequence parallelism cannot run under ZeRO-3 (its weights are partitioned "
                               "until the module's own forward): use ZeRO 1/2 or sequence_parallel=False")
        names, params = zip(*named)
        summed = _SumGradsOverGroup.apply(self.group, *params)
        return torch.func.functional_call(module, dict(zip(names, summed)), args, kwargs)
