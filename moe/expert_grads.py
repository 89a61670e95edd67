"""The routed experts' gradient sum over tensor parallelism under sequence parallelism: once per step, one
bucket, after DeepSpeed's data-parallel reduction.

Under sequence parallelism each TP rank runs the MoE layers on 1/TP of the tokens, so each holds a part of
every expert gradient; the whole gradient is their sum over the TP group. Summing it per block and
micro-batch (with the norms' and gates' gradients, training.model.parallel_regions) moves every expert
parameter once per micro-batch and layer. The sum is linear and so is DeepSpeed's data-parallel
reduction, so summing the REDUCED expert gradients over TP once per step gives the same result: with
`parallelize(..., defer_expert_grads=True)` the blocks leave the experts out of their TP sum and
moe.deepspeed_compat.MoEEngine calls `sum_expert_grads_over_tp` at the gradient-accumulation boundary,
where the reduced gradients are (and before the norm, clipping and the step):
  * ZeRO-1/2 (`DeepSpeedZeroOptimizer`): this rank's partition of each expert param group
    (`averaged_gradients[i]`; TP peers hold identical partition layouts, so the buffers line up);
  * DeepSpeed's bf16 optimizer (ZeRO-1 with bf16): its fp32 expert gradient buffers;
  * ZeRO-0: the experts' .grad.
Megatron gets the same by putting the TP peers in the expert-data-parallel group; this keeps DeepSpeed's
groups (and so its checkpoint files) as they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param


def expert_grad_buffers(engine) -> list[torch.Tensor]:
    """The tensors that hold this rank's reduced expert gradients, in the same order on every TP rank."""
    opt = engine.optimizer
    if hasattr(opt, "averaged_gradients") and hasattr(opt, "is_moe_param_group"):  # ZeRO 1/2
        out = []
        for i, is_moe in enumerate(opt.is_moe_param_group):
            grads = opt.averaged_gradients.get(i) if is_moe else None
            if grads is None:
                continue
            flat = getattr(grads, "flat_partition", None)
            out.extend([flat] if flat is not None else list(grads))
        return out
    if hasattr(opt, "expert_gradients"):  # bf16 optimizer: fp32 flat buffers per expert group
        return [t for name in sorted(opt.expert_gradients) for t in opt.expert_gradients[name]]
    return [p.grad for p in engine.module.parameters() if is_moe_param(p) and p.grad is not None]


def sum_expert_grads_over_tp(engine, tp_group) -> int:
    """All-reduce (sum) the reduced expert gradients over the TP group; returns the elements sent."""
    return sum_over_group(expert_grad_buffers(engine), tp_group)


def sum_over_group(buffers: list[torch.Tensor], group) -> int:
    """Sum the tensors over `group` in place, in one flat bucket per dtype; returns the elements sent."""
    sent = 0
    buffers = [t for t in buffers if t.numel()]
    for dtype in dict.fromkeys(t.dtype for t in buffers):
        same = [t for t in buffers if t.dtype == dtype]
        one = len(same) == 1 and same[0].is_contiguous()
        flat = same[0] if one else torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        if not one:
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(part.view_as(t))
        sent += flat.numel()
    return sent
