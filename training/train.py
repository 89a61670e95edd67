"""`unimoe train`: one curriculum stage on DeepSpeed (ZeRO 1/2/3, EP: DeepSpeed groups, TP: megatron-core).

    unimoe train --config training/configs/tiny/joint.yaml --nproc 2            # local processes
    srun python -m training.cli train --config training/configs/stage3.yaml     # ranks from SLURM
    torchrun --nproc-per-node 8 -m training.cli train --config ...              # ranks from torchrun

Stages (config `stage.stage`): 1 dense specialist from scratch; 2 upcycle the specialists named in
stage.init_from (training.model.upcycle), freeze the routed experts (stage.freeze_experts), train the rest;
3 start from the stage-2 run's weights with everything trainable; 0 = joint MoE from scratch.
A stage starts from weights only; optimizer and schedule start fresh. `--resume` continues a run.

Exit codes: 0 done; 75 (PREEMPTED_EXIT_CODE) SIGTERM/SIGUSR1: the step finished and a checkpoint was
saved, requeue the job; 3 (NONFINITE_EXIT_CODE) too many non-finite steps in a row (checkpoint saved);
2 bad config or arguments.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time

from training.cluster.launch import launch_local
from training.config import ConfigError, load_config, save_config

# torch, numpy and deepspeed are imported inside the functions that need them: the `--nproc` parent
# process only reads the config and starts the ranks.

PREEMPTED_EXIT_CODE = 75
NONFINITE_EXIT_CODE = 3
CONFIG_EXIT_CODE = 2


def lr_at(step: int, ocfg, total_steps: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine to lr * min_lr_ratio at total_steps."""
    if ocfg.warmup_steps and step <= ocfg.warmup_steps:
        return ocfg.lr * step / ocfg.warmup_steps
    span = max(1, total_steps - ocfg.warmup_steps)
    t = min(1.0, (step - ocfg.warmup_steps) / span)
    lo = ocfg.lr * ocfg.min_lr_ratio
    return lo + 0.5 * (ocfg.lr - lo) * (1 + math.cos(math.pi * t))


class StopFlag:
    """SIGTERM/SIGUSR1 set the flag; the loop checks it (agreed by all ranks) after each step."""

    def __init__(self):
        self.signal = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def any_rank(self) -> bool:
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1 if self.signal is not None else 0], device=_comm_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _comm_device():
    """Where small tensors for collectives live: the GPU under NCCL (it refuses CPU tensors), else CPU."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fault_steps(name: str) -> set[int]:
    """Fault injection for tests (e.g. UNIMOE_FAULT_NONFINITE=3,4)."""
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def run_cli(args) -> int:
    """Every ConfigError (loading, layout checks, during set-up) ends the run with one line and exit 2."""
    try:
        return _run(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE


def _run(args) -> int:
    overrides = list(args.overrides or [])
    if getattr(args, "ds_config", None):
        overrides.append(f"parallel.ds_config={os.path.abspath(args.ds_config)}")
    cfg = load_config(args.config, overrides)
    if args.save_every is not None:
        cfg.checkpoint.save_every = args.save_every
    out = args.out or os.path.join("runs", cfg.name)
    if args.nproc:
        cfg.validate(world_size=args.nproc)
        check_init_from(cfg, out, args.resume)
        argv = ["train", "--config", args.config, "--out", out]
        for flag, value in (("--max-steps", args.max_steps), ("--save-every", args.save_every),
                            ("--resume", args.resume)):
            if value is not None:
                argv += [flag, str(value)]
        return launch_local(argv + overrides, args.nproc)
    from training.cluster.parallel import dist_env
    env = dist_env()
    cfg.validate(world_size=env.world_size)
    check_init_from(cfg, out, args.resume)
    return train(cfg, out, max_steps=args.max_steps, resume=args.resume, env=env)


def check_init_from(cfg, out: str, resume: str | None) -> None:
    """A stage that starts from earlier runs needs their complete checkpoints (unless it resumes itself)."""
    if not cfg.stage.init_from:
        return
    from training.checkpoint.save import find_checkpoint
    if resume is not None and find_checkpoint(out if resume == "auto" else resume) is not None:
        return
    for src in cfg.stage.init_from:
        if not os.path.isfile(src) and find_checkpoint(src) is None:
            raise ConfigError(f"stage.init_from: {src} has no complete checkpoint; run the previous stage "
                              "first or point at its run dir / checkpoint tag / exported model.pt")


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _ds_config(cfg, pg) -> dict:
    with open(cfg.parallel.ds_config_path()) as f:
        ds = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    micro = cfg.micro_batch_size(pg.dp)
    ds.update(train_batch_size=cfg.data.global_batch_size, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=cfg.grad_accum(pg.dp),
              # a huge clip still makes ZeRO compute the norm, which is how it detects non-finite grads
              gradient_clipping=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 1e30)
    ds.setdefault("zero_optimization", {})["stage"] = cfg.parallel.zero_stage
    ds["bf16"] = {"enabled": cfg.parallel.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds["zero_allow_untested_optimizer"] = True
    return ds


def train(cfg, out: str, max_steps: int | None = None, resume: str | None = None, env=None) -> int:
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

    from data_prep.mix import MixtureReader
    from moe.deepspeed_compat import initialize as initialize_engine
    from training.checkpoint import save as ckpt
    from training.cluster.parallel import init_parallel, shutdown
    from training.data import DistributedBatches, Prefetcher, resolve_train_mix
    from training.metrics import MetricsLogger, mfu
    from training.model import AudioLM
    from training.stages import init_stage_weights, optimizer_param_groups, step_losses

    stop = StopFlag()
    pg = init_parallel(cfg.parallel, env)
    rank = pg.env.rank
    log = (lambda *a: print("[unimoe train]", *a, flush=True)) if pg.is_main else (lambda *a: None)
    try:
        if pg.is_main:
            os.makedirs(out, exist_ok=True)
            save_config(cfg, os.path.join(out, "config.yaml"))
        # ---- data and model
        mix_path = resolve_train_mix(cfg.data)
        reader = MixtureReader(mix_path)
        from data_prep.text import load_tokenizer
        info = dict(reader.codec_info)
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
            parallelize(model)
        groups = optimizer_param_groups(model, cfg)
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        engine, _, _, _ = initialize_engine(model=model, optimizer=optimizer, config=_ds_config(cfg, pg),
                                            mpu=pg.mpu, dist_init_required=False)
        layout = {"world_size": pg.env.world_size, "tp": pg.tp, "ep": pg.ep, "dp": pg.dp,
                  "zero_stage": cfg.parallel.zero_stage, "precision": cfg.parallel.precision}
        data = DistributedBatches(reader, model_cfg, cfg.data.global_batch_size, cfg.micro_batch_size(pg.dp),
                                  pg.dp_rank, pg.dp, cfg.data.cond_drop_prob, cfg.data.seed)
        # ---- resume
        step, skipped, nonfinite_in_row = 0, 0, 0
        _seed_all(cfg.seed * 1000 + 17 + rank)  # per-rank stream (router jitter, dropout)
        if resume_dir is not None:
            client = ckpt.resume(engine, pg, resume_dir, layout)
            step, skipped = client["step"], client["skipped"]
            nonfinite_in_row = client["nonfinite_in_row"]
            data.load_state_dict(client["data"])
            if client.get("rng") is not None:
                ckpt.set_rng_state(client["rng"])
            else:
                _seed_all(cfg.seed * 1000 + 17 + rank + 7919 * step)
            log(f"resumed {resume_dir} at step {step} ("
                f"{'DeepSpeed files' if client['resumed_native'] else 'portable state, new layout'})")
        metrics = MetricsLogger(out, pg.is_main, cfg.logging.tensorboard, resume_step=step)
        metrics.log_text("config", "    " + json.dumps(cfg.to_dict(), indent=1).replace("\n", "\n    "), step)
        last = min(max_steps or cfg.max_steps, cfg.max_steps)
        total = cfg.optim.schedule_steps or cfg.max_steps
        meta_base = {"config": cfg.to_dict(), "model_config": _model_cfg_dict(model_cfg), "layout": layout,
                     "codec_info": info, "tokenizer_path": reader.tokenizer_path, "mix": mix_path,
                     "stage": cfg.stage.stage}

        def save(reason: str) -> str:
            client = {"step": step, "skipped": skipped, "nonfinite_in_row": nonfinite_in_row,
                      "data": data.state_dict(), "rng": ckpt.rng_state(), "config": cfg.to_dict(),
                      "reason": reason}
            if step in _fault_steps("UNIMOE_FAULT_KILL_IN_SAVE"):
                engine.save_checkpoint(os.path.join(out, ckpt.CKPT_SUBDIR), tag=ckpt.tag_name(step),
                                       client_state=client, save_latest=False)
                os.kill(os.getpid(), signal.SIGKILL)  # a crash after DeepSpeed wrote, before COMPLETE
            path = ckpt.save(engine, pg, out, step, client, {**meta_base, "step": step},
                             cfg.checkpoint.keep_last)
            log(f"saved {path} ({reason})")
            return path

        log(f"stage {cfg.stage.stage}: steps {step + 1}..{last} of {cfg.max_steps}, "
            f"world {pg.env.world_size} "
            f"(tp {pg.tp}, ep {pg.ep}, dp {pg.dp}, zero {cfg.parallel.zero_stage}), "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.2f} M params "
            f"on rank 0, run dir {out}")
        prefetch = Prefetcher(data)
        nan_steps = _fault_steps("UNIMOE_FAULT_NONFINITE")
        on_gpu = engine.device.type != "cpu"
        exit_code, experts_per_token = 0, None
        while step < last:
            step += 1
            lr = lr_at(step, cfg.optim, total)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            batches = prefetch.next_step()
            acc, routing = None, {}
            want_routing = step % cfg.logging.routing_every == 0 or step == 1
            for mb in batches:
                if on_gpu:
                    mb = {k: v.to(engine.device, non_blocking=True) for k, v in mb.items()}
                out_ = engine(mb)
                loss, parts, routing = step_losses(out_, cfg, model_cfg, step, want_routing)
                if step in nan_steps:
                    loss = loss * float("nan")
                engine.backward(loss)
                engine.step()
                acc = parts if acc is None else {k: acc.get(k, 0.0) + v for k, v in parts.items()}
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            ok = math.isfinite(grad_norm) and engine.was_step_applied()
            skipped += 0 if ok else 1
            nonfinite_in_row = 0 if ok else nonfinite_in_row + 1
            record, scalars = _reduce_metrics(acc, len(batches), pg)
            dt = time.perf_counter() - t0
            tokens = _global_tokens(batches, pg)
            record = {"step": step, **record, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / dt, "skipped": skipped}
            experts_per_token = routing.get("routing/experts_per_token", experts_per_token)  # last measured
            est = mfu(record["tokens_per_s"], model_cfg, int(batches[0]["text"].shape[1]), experts_per_token)
            if est is not None:
                scalars["train/mfu_estimate"] = est
            if step % cfg.logging.routing_every == 0 or step == 1:
                scalars.update(routing)  # this rank's (rank 0's) last micro-batch
            metrics.log_step(record, scalars if step % cfg.logging.log_every == 0 else None)
            if nonfinite_in_row >= cfg.optim.max_nonfinite_in_row:
                save("non-finite")
                log(f"error: {nonfinite_in_row} non-finite steps in a row (loss or gradients are NaN/inf) at "
                    f"step {step}; checkpoint saved. Lower optim.lr, check the data, or raise "
                    f"optim.max_nonfinite_in_row.")
                exit_code = NONFINITE_EXIT_CODE
                break
            if step < last and stop.any_rank():
                save("preempted")
                log(f"preempted by signal: saved at step {step}, exit {PREEMPTED_EXIT_CODE} (requeue)")
                exit_code = PREEMPTED_EXIT_CODE
                break
            every = cfg.checkpoint.save_every
            if step == last or (every and step % every == 0):
                save("final" if step == last else "periodic")
        prefetch.close()
        metrics.close()
        return exit_code
    finally:
        shutdown()


def _resume_dir(resume: str | None, out: str) -> str | None:
    from training.checkpoint.save import find_checkpoint
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


def _global_tokens(batches, pg) -> float:
    n = float(sum(int(b["valid"].sum()) for b in batches))
    return n * pg.dp


def _reduce_metrics(acc: dict, n_micro: int, pg) -> tuple[dict, dict]:
    """Mean over micro-batches and data-parallel ranks. Keys 'loss', 'loss_<task>', 'aux_..',
    'codebook/k'; per-task means count only ranks where the task appeared."""
    import torch
    import torch.distributed as dist
    keys = sorted(acc)  # the same on every rank (training.stages.step_losses)
    dev = _comm_device()
    vals = torch.tensor([acc[k] for k in keys], dtype=torch.float64, device=dev)
    counts = torch.tensor([acc.get("_count_" + k, n_micro) for k in keys], dtype=torch.float64, device=dev)
    if dist.is_initialized():
        group = pg.dp_group
        dist.all_reduce(vals, group=group)
        dist.all_reduce(counts, group=group)
    vals, counts = vals.cpu(), counts.cpu()
    mean = {k: float(v / c) for k, v, c in zip(keys, vals, counts)
            if not k.startswith("_count_") and c > 0}  # a task absent from the whole step: no key
    record = {k: v for k, v in mean.items() if k == "loss" or k.startswith("loss_") or k.startswith("aux_")}
    scalars = {k: v for k, v in mean.items() if k not in record}
    return record, scalars

