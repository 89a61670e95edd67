"""Setting up one training run: data, model, DeepSpeed engine, validation data, metrics, and the state it
resumes from. `set_up` returns the Run (what stays fixed) and the TrainState (what the loop advances and
each checkpoint's client state carries); training.train runs the loop on them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from training.config import ConfigError, save_config


@dataclass
class TrainState:
    step: int = 0
    skipped: int = 0  # non-finite steps skipped so far
    nonfinite_in_row: int = 0
    valid: dict = field(default_factory=lambda: {"last": None, "best": None})  # validation, for the meta
    experts_per_token: float | None = None  # last measured (MoE), for the MFU estimate; not checkpointed

    def client(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "nonfinite_in_row": self.nonfinite_in_row,
                "valid": self.valid}


@dataclass
class Run:
    cfg: object
    out: str
    pg: object  # training.cluster.parallel.ParallelGroups
    log: object  # rank 0 prints, the others not
    model_cfg: object
    model: object
    engine: object
    data: object  # training.data.DistributedBatches
    valid_data: object | None  # the same over data.valid, None without validation
    metrics: object  # training.metrics.MetricsLogger
    meta: dict  # what every checkpoint's meta.json holds (+ step, validation)
    last: int  # the last step of this invocation
    total: int  # the LR schedule's length


def set_up(cfg, out: str, pg, log, max_steps: int | None, resume: str | None) -> tuple[Run, TrainState]:
    import torch

    from data_prep.text import load_tokenizer
    from moe.deepspeed_compat import initialize as initialize_engine
    from training.data import DistributedBatches, open_reader, resolve_train_mix
    from training.metrics import MetricsLogger
    from training.model import AudioLM
    from training.stages import init_stage_weights, optimizer_param_groups
    from training.validation import validation_batches

    if pg.is_main:
        os.makedirs(out, exist_ok=True)
        save_config(cfg, os.path.join(out, "config.yaml"))
    mix_path = resolve_train_mix(cfg.data)
    reader = open_reader(cfg.data, mix_path)
    info = dict(reader.codec_info)
    cfg.check_codec(info, mix_path)
    model_cfg = cfg.model_config(text_vocab_size=load_tokenizer(reader.tokenizer_path).vocab_size,
                                 num_codebooks=info.get("num_codebooks"),
                                 codebook_size=info.get("codebook_size"))
    _seed_all(cfg.seed)  # identical non-expert init on every rank
    model = AudioLM(model_cfg, ep_group=pg.ep_group)
    resume_dir = _resume_dir(resume, out)
    if resume_dir is None:
        init_stage_weights(model, cfg, model_cfg, log)
    if pg.tp > 1:
        from training.model.tensor_parallel import parallelize
        parallelize(model, sequence_parallel=cfg.parallel.sequence_parallel_on, defer_expert_grads=True)
    o = cfg.optim
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=o.lr, betas=o.betas, eps=o.eps,
                                  weight_decay=o.weight_decay)
    engine, _, _, _ = initialize_engine(model=model, optimizer=optimizer, config=deepspeed_config(cfg, pg),
                                        mpu=pg.mpu, dist_init_required=False)
    layout = {"world_size": pg.env.world_size, "tp": pg.tp, "ep": pg.ep, "dp": pg.dp,
              "zero_stage": cfg.parallel.zero_stage, "precision": cfg.parallel.precision,
              "device": (torch.cuda.get_device_name() if engine.device.type == "cuda"
                         else engine.device.type)}  # for `unimoe plan --calibrate`
    data = DistributedBatches(reader, model_cfg, cfg.data.global_batch_size, cfg.micro_batch_size(pg.dp),
                              pg.dp_rank, pg.dp, cfg.data.cond_drop_prob, cfg.data.seed,
                              batch_tokens=cfg.data.batch_tokens, batch_window=cfg.data.batch_window)
    valid_data = validation_batches(cfg, reader, model_cfg, pg)
    state = _resume_state(engine, pg, data, cfg, resume_dir, layout, log)
    metrics = MetricsLogger(out, pg.is_main, cfg.logging.tensorboard, resume_step=state.step,
                            wandb_cfg=cfg.metrics.wandb, config=cfg.to_dict())
    text = "    " + json.dumps(cfg.to_dict(), indent=1).replace("\n", "\n    ")
    metrics.log_text("config", text, state.step)
    meta = {"config": cfg.to_dict(), "model_config": _model_cfg_dict(model_cfg), "layout": layout,
            "codec_info": info, "tokenizer_path": reader.tokenizer_path, "mix": mix_path,
            "tokenizer_sha256": reader.tokenizer_sha256,
            "stage": cfg.stage.stage}
    run = Run(cfg, out, pg, log, model_cfg, model, engine, data, valid_data, metrics, meta,
              last=min(max_steps or cfg.max_steps, cfg.max_steps),
              total=cfg.optim.schedule_steps or cfg.max_steps)
    return run, state


def _resume_state(engine, pg, data, cfg, resume_dir: str | None, layout: dict, log) -> TrainState:
    """The per-rank RNG stream and, resuming, the training state (engine, data position, counters, RNG) of
    the checkpoint: at its own layout or resharded on load (training.checkpoint.resume)."""
    from training.checkpoint.client import set_rng_state
    from training.checkpoint.resume import resume as resume_checkpoint
    rank = pg.env.rank
    _seed_all(cfg.seed * 1000 + 17 + rank)  # per-rank stream (dropout)
    if resume_dir is None:
        return TrainState()
    client = resume_checkpoint(engine, pg, resume_dir, layout)
    state = TrainState(client["step"], client["skipped"], client["nonfinite_in_row"],
                       client.get("valid") or {"last": None, "best": None})
    data.load_state_dict(client["data"])
    if client.get("rng") is not None:
        set_rng_state(client["rng"])
    else:
        _seed_all(cfg.seed * 1000 + 17 + rank + 7919 * state.step)
    log(resumed_line(resume_dir, state.step, client.get("resharded_from"), layout))
    return state


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_config(cfg, pg) -> dict:
    with open(cfg.parallel.ds_config_path()) as f:
        ds = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    micro = cfg.micro_batch_size(pg.dp)
    ds.update(train_batch_size=cfg.data.global_batch_size, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=cfg.grad_accum(pg.dp),
              # a huge clip still makes ZeRO compute the norm, which is how it detects non-finite grads
              gradient_clipping=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 1e30)
    ds.setdefault("zero_optimization", {})["stage"] = cfg.parallel.zero_stage
    bf16 = cfg.parallel.precision == "bf16"
    # overflow checking explicit (DeepSpeed's bf16 default changed between releases): a step with
    # non-finite gradients is skipped, not applied. immediate_grad_update: DeepSpeed 0.19's bf16 optimizer
    # otherwise adds each micro-batch's bf16 .grad (which autograd keeps accumulating) into its fp32 buffer
    # at every micro-step, counting micro-batch 1 grad_accum times, 2 grad_accum - 1 times, ...
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16, "check_grad_overflow": True,
                  "immediate_grad_update": True}
    if bf16:  # gradients accumulate over micro-batches (and ZeRO partitions) in fp32
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds["fp16"] = {"enabled": False}
    ds["zero_allow_untested_optimizer"] = True
    return ds


def resumed_line(tag_dir: str, step: int, saved: dict | None, layout: dict) -> str:
    """One line: from DeepSpeed's files at their own layout, an offline reshard's files, or resharded
    on load from another layout."""
    from training.checkpoint.resume import LAYOUT_KEYS, describe_layout
    if saved is None:
        return f"resumed {tag_dir} at step {step} (DeepSpeed files)"
    if all(saved.get(k) == layout.get(k) for k in LAYOUT_KEYS):
        return f"resumed {tag_dir} at step {step} (resharded state)"
    return (f"resumed {tag_dir} at step {step} (resharded on load from {describe_layout(saved)} to "
            f"{describe_layout(layout)}; each rank read only its own tensors)")


def _resume_dir(resume: str | None, out: str) -> str | None:
    from training.checkpoint.manifest import find_checkpoint
    if resume is None:
        return None
    if resume == "auto":
        return find_checkpoint(out)  # None: a fresh start (the first submission of a requeued job)
    found = find_checkpoint(resume)
    if found is None:
        raise ConfigError(f"--resume {resume}: no complete checkpoint there")
    return found


def _model_cfg_dict(model_cfg) -> dict:
    from dataclasses import asdict, is_dataclass
    d = asdict(model_cfg)
    if is_dataclass(model_cfg.moe):
        d["moe"] = asdict(model_cfg.moe)
    return d
