"""`unimoe train`: one curriculum stage on DeepSpeed (ZeRO 1/2/3, EP: DeepSpeed groups, TP: megatron-core).

    unimoe train --config training/configs/tiny/joint.yaml --nproc 2            # local processes
    srun python -m training.cli train --config training/configs/stage3.yaml     # ranks from SLURM
    torchrun --nproc-per-node 8 -m training.cli train --config ...              # ranks from torchrun

Stages (config `stage.stage`): 1 dense specialist from scratch; 2 upcycle the specialists named in
stage.init_from (training.model.upcycle), freeze the routed experts (stage.freeze_experts), train the rest;
3 start from the stage-2 run's weights with everything trainable; 0 = joint MoE from scratch.
A stage starts from weights only; optimizer and schedule start fresh. `--resume` continues a run.

Exit codes: 0 done; 75 (PREEMPTED_EXIT_CODE) SIGTERM/SIGUSR1: the step finished and a checkpoint was
saved, requeue the job (also: the final save was refused for lack of disk space); 3
(NONFINITE_EXIT_CODE) too many non-finite steps in a row (no checkpoint: `latest` stays on the last
finite one); 2 bad config or arguments, or a checkpoint that is missing files or cannot be read
safely. A step whose loss or gradient norm is non-finite (or whose norm DeepSpeed reports as negative,
its invalid-norm sentinel) counts as skipped and is never checkpointed; the bf16 DeepSpeed config gets
explicit overflow checking and fp32 gradient accumulation.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time

from training.checkpoint.manifest import CheckpointError
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
        import torch.distributed as dist

        from training.cluster.parallel import all_reduce_values
        return all_reduce_values([1.0 if self.signal is not None else 0.0], dist.ReduceOp.MAX)[0] > 0


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
    except CheckpointError as e:  # missing, truncated or unreadable checkpoint files
        print(f"checkpoint error: {e}", file=sys.stderr)
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
        max_steps = cap_max_steps(args.max_steps, cfg, say=True)  # the children get the capped value
        for flag, value in (("--max-steps", max_steps), ("--save-every", args.save_every),
                            ("--resume", args.resume)):
            if value is not None:
                argv += [flag, str(value)]
        return launch_local(argv + overrides, args.nproc)
    from training.cluster.parallel import dist_env
    env = dist_env()
    cfg.validate(world_size=env.world_size)
    _check_gpu_for_rank(env)
    check_init_from(cfg, out, args.resume)
    max_steps = cap_max_steps(args.max_steps, cfg, say=env.rank == 0)
    return train(cfg, out, max_steps=max_steps, resume=args.resume, env=env)


def cap_max_steps(max_steps: int | None, cfg, say: bool) -> int | None:
    """`--max-steps` only stops earlier than the config's max_steps; a larger value is capped, with one line
    that says how to train longer."""
    if max_steps is None or max_steps <= cfg.max_steps:
        return max_steps
    if say:
        print(f"[unimoe train] --max-steps {max_steps} is capped at the config's max_steps={cfg.max_steps} "
              f"(--max-steps only stops earlier); to train longer, override max_steps={max_steps}",
              flush=True)
    return cfg.max_steps


def _check_gpu_for_rank(env) -> None:
    import torch
    if torch.cuda.is_available() and env.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank {env.rank} has local rank {env.local_rank} but this node has "
                          f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node "
                          "(--nproc), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU")


def check_init_from(cfg, out: str, resume: str | None) -> None:
    """A stage that starts from earlier runs needs their complete checkpoints (unless it resumes itself)."""
    if not cfg.stage.init_from:
        return
    from training.checkpoint.manifest import find_checkpoint
    if resume is not None and find_checkpoint(out if resume == "auto" else resume) is not None:
        return
    for src in cfg.stage.init_from:
        if not os.path.isfile(src) and find_checkpoint(src) is None:
            raise ConfigError(f"stage.init_from: {src} has no complete checkpoint; run the previous stage "
                              "first or point at its run dir / checkpoint tag / exported model.safetensors")


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
    # non-finite gradients is skipped, not applied
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16, "check_grad_overflow": True}
    if bf16:  # gradients accumulate over micro-batches (and ZeRO partitions) in fp32
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds["fp16"] = {"enabled": False}
    ds["zero_allow_untested_optimizer"] = True
    return ds


def train(cfg, out: str, max_steps: int | None = None, resume: str | None = None, env=None) -> int:
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

    from moe.deepspeed_compat import initialize as initialize_engine
    from training.checkpoint import client as ckpt_client
    from training.checkpoint import save as ckpt
    from training.checkpoint.resume import resume as resume_checkpoint
    from training.cluster.parallel import init_parallel, shutdown
    from training.data import DistributedBatches, Prefetcher, open_reader, padding_fraction, resolve_train_mix
    from training.metrics import MetricsLogger, mfu
    from training.model import AudioLM
    from training.stages import init_stage_weights, optimizer_param_groups, step_losses

    stop = StopFlag()
    pg = init_parallel(cfg.parallel, env)
    rank = pg.env.rank
    log = (lambda *a: print("[unimoe train]", *a, flush=True)) if pg.is_main else (lambda *a: None)
    finished = False
    try:
        if pg.is_main:
            os.makedirs(out, exist_ok=True)
            save_config(cfg, os.path.join(out, "config.yaml"))
        # ---- data and model
        mix_path = resolve_train_mix(cfg.data)
        reader = open_reader(cfg.data, mix_path)
        from data_prep.text import load_tokenizer
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
            parallelize(model, sequence_parallel=cfg.parallel.sequence_parallel_on)
        groups = optimizer_param_groups(model, cfg)
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        ds_config = deepspeed_config(cfg, pg)
        engine, _, _, _ = initialize_engine(model=model, optimizer=optimizer, config=ds_config,
                                            mpu=pg.mpu, dist_init_required=False)
        layout = {"world_size": pg.env.world_size, "tp": pg.tp, "ep": pg.ep, "dp": pg.dp,
                  "zero_stage": cfg.parallel.zero_stage, "precision": cfg.parallel.precision}
        data = DistributedBatches(reader, model_cfg, cfg.data.global_batch_size, cfg.micro_batch_size(pg.dp),
                                  pg.dp_rank, pg.dp, cfg.data.cond_drop_prob, cfg.data.seed,
                                  batch_tokens=cfg.data.batch_tokens, batch_window=cfg.data.batch_window)
        # ---- resume
        step, skipped, nonfinite_in_row = 0, 0, 0
        _seed_all(cfg.seed * 1000 + 17 + rank)  # per-rank stream (router jitter, dropout)
        if resume_dir is not None:
            client = resume_checkpoint(engine, pg, resume_dir, layout)
            step, skipped = client["step"], client["skipped"]
            nonfinite_in_row = client["nonfinite_in_row"]
            data.load_state_dict(client["data"])
            if client.get("rng") is not None:
                ckpt_client.set_rng_state(client["rng"])
            else:
                _seed_all(cfg.seed * 1000 + 17 + rank + 7919 * step)
            log(f"resumed {resume_dir} at step {step} ("
                f"{'DeepSpeed files' if client['resumed_native'] else 'resharded state'})")
        metrics = MetricsLogger(out, pg.is_main, cfg.logging.tensorboard, resume_step=step)
        metrics.log_text("config", "    " + json.dumps(cfg.to_dict(), indent=1).replace("\n", "\n    "), step)
        last = min(max_steps or cfg.max_steps, cfg.max_steps)
        total = cfg.optim.schedule_steps or cfg.max_steps
        meta_base = {"config": cfg.to_dict(), "model_config": _model_cfg_dict(model_cfg), "layout": layout,
                     "codec_info": info, "tokenizer_path": reader.tokenizer_path, "mix": mix_path,
                     "stage": cfg.stage.stage}

        def save(reason: str) -> str:
            client = {"step": step, "skipped": skipped, "nonfinite_in_row": nonfinite_in_row,
                      "data": data.state_dict(), "rng": ckpt_client.rng_state(), "config": cfg.to_dict(),
                      "reason": reason}
            if step in _fault_steps("UNIMOE_FAULT_KILL_IN_SAVE"):
                engine.save_checkpoint(os.path.join(out, ckpt.CKPT_SUBDIR), tag=ckpt.tag_name(step),
                                       client_state=client, save_latest=False)
                os.kill(os.getpid(), signal.SIGKILL)  # a crash after DeepSpeed wrote, before COMPLETE
            path = ckpt.save(engine, pg, out, step, client, {**meta_base, "step": step}, cfg.checkpoint)
            log(f"saved {path} ({reason})" if path else f"checkpoint of step {step} ({reason}) refused")
            return path

        log(f"stage {cfg.stage.stage}: steps {step + 1}..{last} of {cfg.max_steps}, "
            f"world {pg.env.world_size} on {engine.device} "
            f"(tp {pg.tp}{' sequence-parallel' if cfg.parallel.sequence_parallel_on else ''}, ep {pg.ep}, "
            f"dp {pg.dp}, zero {cfg.parallel.zero_stage}), "
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
            # routing stats (host copies) on logging steps only, of the micro-batch rank 0 logs: its last
            want_routing = pg.is_main and (step % cfg.logging.routing_every == 0 or step == 1)
            for i, mb in enumerate(batches):
                if on_gpu:
                    mb = {k: v.to(engine.device, non_blocking=True) for k, v in mb.items()}
                out_ = engine(mb)
                loss, parts, routing = step_losses(out_, cfg, model_cfg, step,
                                                   want_routing and i == len(batches) - 1)
                if step in nan_steps:
                    loss = loss * float("nan")
                engine.backward(loss)
                engine.step()
                acc = parts if acc is None else {k: acc.get(k, 0.0) + v for k, v in parts.items()}
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            applied = step_applied(grad_norm, engine.was_step_applied())
            skipped += 0 if applied else 1
            record, scalars = _reduce_metrics(acc, len(batches), pg)
            finite = applied and math.isfinite(record["loss"])  # the same on every rank
            nonfinite_in_row = 0 if finite else nonfinite_in_row + 1
            dt = time.perf_counter() - t0
            tokens = _global_tokens(batches, pg)
            record = {"step": step, **record, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / dt, "skipped": skipped,
                      "padding_fraction": padding_fraction(batches)}  # of rank 0's micro-batches
            experts_per_token = routing.get("routing/experts_per_token", experts_per_token)  # last measured
            if "routing/experts_per_token" in routing:  # rank 0's last micro-batch (for plan --calibrate)
                record["experts_per_token"] = experts_per_token
            est = mfu(record["tokens_per_s"], model_cfg, int(batches[0]["text"].shape[1]), experts_per_token,
                      num_gpus=pg.env.world_size, peak=cfg.logging.peak_flops)
            if est is not None:
                record["mfu"] = est
            scalars.update(routing)  # empty but on rank 0's routing steps
            metrics.log_step(record, scalars if step % cfg.logging.log_every == 0 else None)
            if nonfinite_in_row >= cfg.optim.max_nonfinite_in_row:
                log(f"error: {nonfinite_in_row} non-finite steps in a row (loss or gradients are NaN/inf) at "
                    f"step {step}; no checkpoint written (latest stays on the last finite one). Lower "
                    f"optim.lr, check the data, or raise optim.max_nonfinite_in_row.")
                exit_code = NONFINITE_EXIT_CODE
                break
            preempted = step < last and stop.any_rank()
            every = cfg.checkpoint.save_every
            if preempted or step == last or (every and step % every == 0):
                if finite and _weights_finite(model):
                    path = save("preempted" if preempted else "final" if step == last else "periodic")
                    if path is None and step == last:  # the final save was refused for lack of space:
                        exit_code = PREEMPTED_EXIT_CODE  # requeue once there is room
                else:
                    log(f"step {step} is non-finite: no checkpoint (latest stays on the last finite one)")
            if preempted:
                log(f"preempted by signal at step {step}, exit {PREEMPTED_EXIT_CODE} (requeue)")
                exit_code = PREEMPTED_EXIT_CODE
                break
        prefetch.close()
        metrics.close()
        finished = True
        return exit_code
    finally:
        if finished:  # an error leaves with no collective: a barrier could pair with a peer's pending one
            shutdown()


def step_applied(grad_norm: float, applied: bool) -> bool:
    """Did the optimizer step update the weights with finite gradients? DeepSpeed reports an invalid
    gradient norm as inf/NaN or as its -1 sentinel (older releases, or bf16 without overflow checks)."""
    return applied and math.isfinite(grad_norm) and grad_norm >= 0


def _weights_finite(model) -> bool:
    """All ranks agree whether every local weight is finite (collective; before a checkpoint)."""
    import torch
    import torch.distributed as dist

    from training.cluster.parallel import all_reduce_values
    ok = bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())  # one host sync
    return all_reduce_values([1.0 if ok else 0.0], dist.ReduceOp.MIN)[0] > 0


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


def _global_tokens(batches, pg) -> float:
    n = float(sum(int(b["valid"].sum()) for b in batches))
    return n * pg.dp


def _reduce_metrics(acc: dict, n_micro: int, pg) -> tuple[dict, dict]:
    """Mean over micro-batches and data-parallel ranks. Keys 'loss', 'loss_<task>', 'aux_..',
    'codebook/k'; per-task means count only ranks where the task appeared."""
    from training.cluster.parallel import all_reduce_values
    keys = sorted(acc)  # the same on every rank (training.stages.step_losses)
    summed = all_reduce_values([acc[k] for k in keys] + [acc.get("_count_" + k, n_micro) for k in keys],
                               group=pg.dp_group)
    vals, counts = summed[: len(keys)], summed[len(keys):]
    mean = {k: v / c for k, v, c in zip(keys, vals, counts)
            if not k.startswith("_count_") and c > 0}  # a task absent from the whole step: no key
    record = {k: v for k, v in mean.items() if k == "loss" or k.startswith("loss_") or k.startswith("aux_")}
    scalars = {k: v for k, v in mean.items() if k not in record}
    return record, scalars

