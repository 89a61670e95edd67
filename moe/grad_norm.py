"""The gradient norm of the whole model, each gradient counted once, at any TP x EP x DP layout.

    norm = global_grad_norm(model.parameters(), tp_group)   # after the data-parallel gradient reduction
    clip_grads_(model.parameters(), max_norm, norm)

Who holds what (after DeepSpeed's reduction, gradients are the same on every data-parallel rank that holds
the same parameter):
  * tensor-parallel shards (megatron-core's `tensor_model_parallel` attribute): one piece per TP rank,
    summed over the TP group;
  * replicated non-expert weights (norms, gates, shared experts, codebook embeddings): the same on every
    TP rank, counted once (TP rank 0's);
  * routed experts (DeepSpeed's `is_moe_param`, group "ep_size_<N>"): each rank holds its experts whole
    (replicated over TP, never split), summed over their expert-parallel group.
DeepSpeed's ZeRO-0 path averages per-rank norms over data parallelism instead (not the global norm once
ranks hold different experts) and records none; moe.deepspeed_compat.MoEEngine uses this one there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param


def _sum_sq(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def global_grad_norm(params, tp_group=None) -> torch.Tensor:
    """fp32 scalar tensor (inf/NaN when a gradient is): the 2-norm of all of the model's gradients."""
    from deepspeed.utils import groups
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    first_tp = tp == 1 or dist.get_rank(tp_group) == 0
    sharded = [p.grad for p in params if getattr(p, "tensor_model_parallel", False)]
    replicated = [p.grad for p in params
                  if not is_moe_param(p) and not getattr(p, "tensor_model_parallel", False)]
    dense = _sum_sq(sharded, device) + (_sum_sq(replicated, device) if first_tp else 0.0)
    if tp > 1:
        dist.all_reduce(dense, group=tp_group)
    total = dense
    experts: dict[str, list[torch.Tensor]] = {}
    for p in params:
        if is_moe_param(p):
            experts.setdefault(p.group_name, []).append(p.grad)
    for name in sorted(experts):  # the same names, in the same order, on every rank
        part = _sum_sq(experts[name], device)
        group = groups._get_expert_parallel_group(name)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(part, group=group)
        total = total + part
    return total.sqrt()


def clip_grads_(params, max_norm: float, norm: torch.Tensor, eps: float = 1e-6) -> None:
    """Scale every gradient by min(1, max_norm / (norm + eps)) in place (norm: global_grad_norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    coef = (max_norm / (norm + eps)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
