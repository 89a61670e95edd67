"""Curriculum stage starts and the per-step loss of the training loop.

Stage starts (weights only; optimizer and LR schedule start fresh):
    0, 1   from scratch (joint MoE baseline, dense specialist)
    2      training.model.upcycle.upcycle(the specialists' fp32 state dicts, MoE model config)
    3      the stage-2 run's newest complete checkpoint (all experts, loaded by global name)
"""

from __future__ import annotations

from training.model import TASKS


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


def step_losses(out, cfg, model_cfg, step: int, want_routing: bool = True):
    """-> (loss to backpropagate, fixed-key floats for metrics, routing stats of this micro-batch).

    Fixed keys (identical on every rank, so they can be all-reduced): loss, loss_<task> with
    _count_loss_<task> (0 when the task is absent here), codebook/<k>, aux_* for MoE models."""
    loss = out.loss
    parts = {"loss": float(out.loss.detach())}
    for t in TASKS:
        v = out.loss_per_task.get(t)
        parts[f"loss_{t}"] = float(v.detach()) if v is not None else 0.0
        parts[f"_count_loss_{t}"] = 1.0 if v is not None else 0.0
    if out.loss_per_codebook is not None:
        for k, v in enumerate(out.loss_per_codebook.detach().tolist()):
            parts[f"codebook/{k}"] = float(v)
    routing = {}
    if out.aux:
        from moe.losses import combine_aux
        aux_total, logs = combine_aux(out.aux, step, model_cfg.moe_config())
        loss = loss + aux_total
        for k, v in logs.items():
            parts[k if k.startswith("aux_") else f"aux_{k}"] = float(v)
        if want_routing:  # computing the stats costs a little: only on logging steps
            from moe.stats import summarize
            routing = summarize(out.aux, prefix="routing")  # per layer and per task, + means over layers
    return loss, parts, routing
