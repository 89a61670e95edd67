"""The LM loss of an optimizer step, normalised per target token of the GLOBAL batch (as Megatron and
torchtitan do), so that data parallelism and gradient accumulation do not change it.

    tokens = StepTokens.of(batches, pg, model_cfg.codebook_loss, device)  # one all-reduce of the counts
    rows = tokens.contributions(out, batch["task"])   # this micro-batch's share: [1 + tasks] (all, per task)
    engine.backward(tokens.scale * rows[0] + aux_loss)

Per codebook k: loss_k = (sum of the token losses of codebook k over the global batch) / (the global count of
codebook k's targets); the step's loss is sum_k loss_k (codebook_loss "sum", the paper's) or the mean over
k. Each micro-batch contributes its token-loss sums divided by the GLOBAL counts, so the sum of the
contributions over micro-batches and data-parallel ranks is the step's loss, whatever the layout. DeepSpeed
divides the gradient by the gradient-accumulation steps and averages it over the data-parallel ranks
(experts: over the ranks that hold them, divided by the same data-parallel size); `scale` = dp x
grad_accum undoes both, so the gradient is the one of the global per-token loss. Per-task rows use the
task's own global counts (a task absent from the whole step has count 0 and contributes 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.model.lm import IGNORE_INDEX, TASKS


def target_counts(batch: dict) -> torch.Tensor:
    """float64 [1 + tasks, K]: targets per codebook in the batch, all samples and per task."""
    per_sample = (batch["labels"] != IGNORE_INDEX).sum(2).to(torch.float64)  # [B, K]
    onehot = torch.nn.functional.one_hot(batch["task"], len(TASKS)).to(torch.float64)  # [B, T]
    return torch.cat([per_sample.sum(0, keepdim=True), onehot.t() @ per_sample])


@dataclass
class StepTokens:
    counts: torch.Tensor  # [1 + tasks, K] global target counts of the step (on the model's device)
    scale: float  # dp x grad_accum: what DeepSpeed's averaging divides the gradient by
    codebook_loss: str  # "sum" or "mean" over codebooks

    @classmethod
    def of(cls, batches: list[dict], pg, codebook_loss: str, device) -> StepTokens:
        """This rank's micro-batches of the step -> the global counts (all-reduced over data parallelism;
        tensor-parallel peers hold the same batches). No host sync: the counts stay on the device."""
        from training.cluster.parallel import comm_device
        local = sum(target_counts(b) for b in batches)
        if dist.is_initialized() and pg.dp > 1:
            local = local.to(comm_device())
            dist.all_reduce(local, group=pg.dp_group)
        return cls(local.to(device=device, dtype=torch.float32), float(pg.dp * len(batches)), codebook_loss)

    def contributions(self, out, task: torch.Tensor) -> torch.Tensor:
        """[1 + tasks]: this micro-batch's share of the step's loss, all samples then per task (with grad)."""
        onehot = torch.nn.functional.one_hot(task, len(TASKS)).to(out.token_loss_sum.dtype)
        sums = torch.cat([out.token_loss_sum.sum(0, keepdim=True), onehot.t() @ out.token_loss_sum])
        per_cb = sums / self.counts.clamp(min=1.0)
        return per_cb.sum(-1) if self.codebook_loss == "sum" else per_cb.mean(-1)

    def per_codebook(self, out) -> torch.Tensor:
        """[K] this micro-batch's share of each codebook's step loss (for logging)."""
        return out.token_loss_sum.sum(0) / self.counts[0].clamp(min=1.0)
