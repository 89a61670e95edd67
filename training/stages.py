"""Curriculum stage starts and the per-step loss of the training loop.

StepTokens (end of file): the loss normalisation per target token of the global batch.

Stage starts (weights only; optimizer and LR schedule start fresh):
    0, 1   from scratch (joint MoE baseline, dense specialist)
    2      training.model.upcycle.upcycle(the specialists' fp32 state dicts, MoE model config)
    3      the stage-2 run's newest complete checkpoint (all experts, loaded by global name)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.model import TASKS
from training.model.lm import IGNORE_INDEX


def init_stage_weights(model, cfg, model_cfg, log=print) -> None:
    from training.checkpoint.weights import check_codebooks, full_state_dict, load_into_model, load_weights
    stage, sources = cfg.stage.stage, cfg.stage.init_from
    if stage in (0, 1) and not sources:
        return
    if stage == 2:
        from training.model.upcycle import upcycle_state_dict
        sds = []
        for src in sources:
            sd, meta = full_state_dict(src)
            check_codebooks(meta, model_cfg, src)
            sds.append(sd)
            log(f"stage 2: specialist {src} (step {meta.get('step')}, stage {meta.get('stage')})")
        full = upcycle_state_dict(sds, model_cfg, seed=cfg.seed)
        load_into_model(model, full, f"upcycle({', '.join(sources)})")
        n = model_cfg.moe_config().num_routed_experts
        log(f"stage 2: upcycled {len(sds)} specialists into {n} routed experts per MoE layer")
        return
    if len(sources) != 1:
        raise ValueError(f"stage {stage}: stage.init_from must name one run (got {sources})")
    meta = load_weights(model, sources[0])  # only the tensors this rank holds
    log(f"stage {stage}: weights from {sources[0]} (step {meta.get('step')}, stage {meta.get('stage')})")


def optimizer_param_groups(model, cfg) -> list[dict]:
    """AdamW param groups. Stage 2's routed experts (stage.freeze_experts) are frozen for real: requires_grad
    False and in no group, so they get no weight gradients, no optimizer state and no gradient reduction.
    For an MoE model DeepSpeed's helper splits the rest into non-expert and expert ("moe") groups; with
    every expert frozen there is no "moe" group, which DeepSpeed's own engine refuses and
    moe.deepspeed_compat.MoEEngine (built by its `initialize`) accepts."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    if cfg.stage.freeze_experts:
        for p in model.parameters():
            if is_moe_param(p):
                p.requires_grad_(False)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "main"}]
    if cfg.is_moe:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def step_losses(out, cfg, model_cfg, step: int, want_routing: bool = True, tokens=None, task=None):
    """-> (loss to backpropagate, fixed-key values for metrics, routing stats of this micro-batch).

    Fixed keys (identical on every rank, so they can be all-reduced): loss, loss_<task> with
    _count_loss_<task> (0 when the task is absent here), codebook/<k>, aux_* for MoE models.
    With `tokens` (StepTokens of the step, and the micro-batch's `task` [B]) the LM loss
    is normalised per target token of the global batch and loss, loss_<task> and codebook/<k> are this
    micro-batch's shares (summed, not averaged, over the step: training.train._reduce_metrics); without,
    the micro-batch's own mean. The values stay detached tensors on the device (no host sync per
    micro-batch): summed over the step, they are read back once, by the step's all-reduce."""
    if tokens is None:
        loss = out.loss
        lm = torch.stack([out.loss] + [out.loss_per_task.get(t, out.loss) for t in TASKS]).detach().float()
        per_cb = out.loss_per_codebook
    else:
        rows = tokens.contributions(out, task)
        loss, lm, per_cb = tokens.scale * rows[0], rows.detach().float(), tokens.per_codebook(out)
    if out.task_present is not None:  # on the device: no sync to know which tasks are here
        present = out.task_present.unbind()
    else:
        present = [float(t in out.loss_per_task) for t in TASKS]
    parts = {"loss": lm[0]}
    for i, t in enumerate(TASKS):
        parts[f"loss_{t}"] = lm[1 + i] * present[i]
        parts[f"_count_loss_{t}"] = present[i]
    if per_cb is not None:
        for k, v in enumerate(per_cb.detach().float().unbind()):
            parts[f"codebook/{k}"] = v
    routing = {}
    if out.aux:
        from moe.losses import combine_aux
        aux_total, logs = combine_aux(out.aux, step, model_cfg.moe_config(), host=False)
        loss = loss + aux_total
        for k, v in logs.items():
            parts[k if k.startswith("aux_") else f"aux_{k}"] = v
        if want_routing:  # computing the stats costs a little: only on logging steps
            from moe.stats import summarize
            routing = summarize(out.aux, prefix="routing")  # per layer and per task, + means over layers
    return loss, parts, routing


# ---- the LM loss of a step per target token of the global batch
# The LM loss of an optimizer step, normalised per target token of the GLOBAL batch (as Megatron and
# torchtitan do), so that data parallelism and gradient accumulation do not change it.
#
#     tokens = StepTokens.of(batches, pg, model_cfg.codebook_loss, device)  # one all-reduce of the counts
#     rows = tokens.contributions(out, batch["task"])  # this micro-batch's share: [all, per task]
#     engine.backward(tokens.scale * rows[0] + aux_loss)
#
# Per codebook k: loss_k = (sum of the token losses of codebook k over the global batch) / (the global
# count of codebook k's targets); the step's loss is sum_k loss_k (codebook_loss "sum", the paper's) or
# the mean over k. Each micro-batch contributes its token-loss sums divided by the GLOBAL counts, so the
# sum of the contributions over micro-batches and data-parallel ranks is the step's loss, whatever the
# layout. DeepSpeed divides the gradient by the gradient-accumulation steps and averages it over the data-
# parallel ranks (experts: over the ranks that hold them, divided by the same data-parallel size); `scale`
# = dp x grad_accum undoes both, so the gradient is the one of the global per-token loss. Per-task rows
# use the task's own global counts (a task absent from the whole step has count 0 and contributes 0).


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
