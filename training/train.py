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

import math
import os
import signal
import sys
import time

from training.checkpoint.manifest import CheckpointError, check_resume_arg
from training.cluster.launch import launch_local
from training.config import ConfigError, load_config

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
    except ConfigError as e:  # the same config on every rank: said once, by rank 0 (unless rank-specific)
        if _launcher_rank() == 0 or getattr(e, "every_rank", False):
            print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    except CheckpointError as e:  # missing, truncated or unreadable files: each rank reads its own
        print(f"checkpoint error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE


def _launcher_rank() -> int:
    """This process's rank as the launcher set it (torchrun/--nproc RANK, srun SLURM_PROCID), 0 if none."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _run(args) -> int:
    overrides = list(args.overrides or [])
    if getattr(args, "ds_config", None):
        overrides.append(f"parallel.ds_config={os.path.abspath(args.ds_config)}")
    cfg = load_config(args.config, overrides)
    if args.save_every is not None:
        cfg.checkpoint.save_every = args.save_every
    out = args.out or os.path.join("runs", cfg.name)
    check_resume_arg(args.resume, out)  # before any process starts
    if args.nproc:
        cfg.validate(world_size=args.nproc)
        check_init_from(cfg, out, args.resume, say=lambda *a: None)  # warnings: from rank 0
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
    check_init_from(cfg, out, args.resume, say=print if env.rank == 0 else lambda *a: None)
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

    from training.cluster.parallel import cpu_accelerator
    if torch.cuda.is_available() and not cpu_accelerator() and env.local_rank >= torch.cuda.device_count():
        err = ConfigError(f"rank {env.rank} has local rank {env.local_rank} but this node has "
                          f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node "
                          "(--nproc), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU")
        err.every_rank = True  # this rank's own problem: said by the ranks that have it
        raise err


def check_init_from(cfg, out: str, resume: str | None, say=print) -> None:
    """A stage that starts from earlier runs needs their complete checkpoints (unless it resumes itself)."""
    if not cfg.stage.init_from:
        return
    from training.checkpoint.bundle import is_bundle
    from training.checkpoint.manifest import find_checkpoint
    if resume is not None and find_checkpoint(out if resume == "auto" else resume) is not None:
        return
    for src in cfg.stage.init_from:
        if not os.path.isfile(src) and not is_bundle(src) and find_checkpoint(src) is None:
            raise ConfigError(f"stage.init_from: {src} has no complete checkpoint; run the previous stage "
                              "first or point at its run dir / checkpoint tag / exported model directory")
    from training.checkpoint.tokenizers import check_init_sources
    check_init_sources(cfg.stage.init_from, cfg.data.train, log=say)


def train(cfg, out: str, max_steps: int | None = None, resume: str | None = None, env=None) -> int:
    """Set up, then the loop: step, evaluate, log, save. Returns the exit code (0, 3 or 75)."""
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

    from training.cluster.parallel import init_parallel, shutdown, use_tf32
    from training.setup_run import set_up

    stop = StopFlag()
    pg = init_parallel(cfg.parallel, env)
    use_tf32(cfg.parallel.precision)
    log = (lambda *a: print("[unimoe train]", *a, flush=True)) if pg.is_main else (lambda *a: None)
    finished = False
    try:
        run, state = set_up(cfg, out, pg, log, max_steps, resume)
        log(_start_line(run, state))
        exit_code = _loop(run, state, stop)
        run.metrics.close()
        finished = True
        return exit_code
    finally:
        if finished:  # an error leaves with no collective: a barrier could pair with a peer's pending one
            shutdown()


def _loop(run, state, stop) -> int:
    """Step, evaluate, log, save, until the last step (0; 75 when the final save found no room), a
    preemption signal on any rank (75) or too many non-finite steps in a row (3)."""
    from training.data import Prefetcher
    from training.metrics import ProgressLine
    from training.validation import evaluation_due

    cfg, log = run.cfg, run.log
    prefetch = Prefetcher(run.data, pin=run.engine.device.type != "cpu")  # pinned: the copies are async
    mcfg = run.model_cfg
    progress = ProgressLine(state.step + 1, run.last, mcfg.num_codebooks, mcfg.codebook_loss,
                            run.engine.device.type != "cpu")
    exit_code = 0
    try:
        while state.step < run.last:
            state.step += 1
            record, scalars, finite = train_step(run, state, prefetch)
            evaluated = (run.valid_data is not None
                         and evaluation_due(state.step, run.last, cfg.logging.eval_every))
            if evaluated:
                evaluate(run, state, record, scalars)
            log_step(run, progress, record, scalars, evaluated)
            if state.nonfinite_in_row >= cfg.optim.max_nonfinite_in_row:
                log(f"error: {state.nonfinite_in_row} non-finite steps in a row (loss or gradients are "
                    f"NaN/inf) at step {state.step}; no checkpoint written (latest stays on the last finite "
                    f"one). Lower optim.lr, check the data, or raise optim.max_nonfinite_in_row.")
                return NONFINITE_EXIT_CODE
            preempted = state.step < run.last and stop.any_rank()
            if save_due(state.step, run.last, cfg.checkpoint.save_every, preempted):
                reason = "preempted" if preempted else "final" if state.step == run.last else "periodic"
                if not (finite and _weights_finite(run.model)):
                    log(f"step {state.step} is non-finite: no checkpoint (latest stays on the last finite "
                        "one)")
                elif save(run, state, reason) is None and state.step == run.last:
                    exit_code = PREEMPTED_EXIT_CODE  # the final save was refused for lack of space: requeue
            if preempted:
                log(f"preempted by signal at step {state.step}, exit {PREEMPTED_EXIT_CODE} (requeue)")
                return PREEMPTED_EXIT_CODE
        return exit_code
    finally:
        prefetch.close()


def _start_line(run, state) -> str:
    cfg, pg = run.cfg, run.pg
    params = sum(getattr(p, "ds_numel", p.numel()) for p in run.model.parameters()) / 1e6
    return (f"stage {cfg.stage.stage}: steps {state.step + 1}..{run.last} of {cfg.max_steps}, "
            f"world {pg.env.world_size} on {run.engine.device} "
            f"(tp {pg.tp}{' sequence-parallel' if cfg.parallel.sequence_parallel_on else ''}, ep {pg.ep}, "
            f"dp {pg.dp}, zero {cfg.parallel.zero_stage}), {params:.2f} M params on rank 0, "
            f"run dir {run.out}")


def train_step(run, state, prefetch) -> tuple[dict, dict, bool]:
    """One optimizer step over this rank's micro-batches -> (metrics.jsonl record, tensorboard-only scalars,
    finite: the step was applied with a finite loss, the same on every rank)."""
    from moe.layer import set_jitter_seed
    from training.data import padding_fraction
    from training.metrics import loss_per_codebook, mfu, peak_memory_mib
    from training.stages import StepTokens, step_losses

    cfg, pg, engine, model_cfg, step = run.cfg, run.pg, run.engine, run.model_cfg, state.step
    lr = lr_at(step, cfg.optim, run.total)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    batches = prefetch.next_step()
    tokens = StepTokens.of(batches, pg, model_cfg.codebook_loss, engine.device)  # per global token
    set_jitter_seed(run.model, cfg.seed, step)  # router jitter keyed by (seed, step, layer, token)
    acc, routing = None, {}
    # routing stats (host copies) on logging steps only, of the micro-batch rank 0 logs: its last
    want_routing = pg.is_main and (step % cfg.logging.routing_every == 0 or step == 1)
    nan_steps = _fault_steps("UNIMOE_FAULT_NONFINITE")
    for i, mb in enumerate(batches):
        if engine.device.type != "cpu":
            mb = {k: v.to(engine.device, non_blocking=True) for k, v in mb.items()}
        out = engine(mb)
        loss, parts, routing = step_losses(out, cfg, model_cfg, step, want_routing and i == len(batches) - 1,
                                           tokens, mb["task"])
        if step in nan_steps:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        acc = parts if acc is None else {k: acc.get(k, 0.0) + v for k, v in parts.items()}
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    applied = step_applied(grad_norm, engine.was_step_applied())
    state.skipped += 0 if applied else 1
    record, scalars = _reduce_metrics(acc, len(batches), pg)
    finite = applied and math.isfinite(record["loss"])  # the same on every rank
    state.nonfinite_in_row = 0 if finite else state.nonfinite_in_row + 1
    tokens_per_s = _global_tokens(batches, pg) / (time.perf_counter() - t0)
    record = {"step": step, **record,
              "loss_per_codebook": loss_per_codebook(record["loss"], model_cfg.num_codebooks,
                                                     model_cfg.codebook_loss),
              "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "skipped": state.skipped,
              "padding_fraction": padding_fraction(batches),  # of rank 0's micro-batches
              "peak_memory_mib": peak_memory_mib(engine.device)}
    if "routing/experts_per_token" in routing:  # rank 0's last micro-batch (for plan --calibrate)
        state.experts_per_token = record["experts_per_token"] = routing["routing/experts_per_token"]
    est = mfu(tokens_per_s, model_cfg, int(batches[0]["text"].shape[1]), state.experts_per_token,
              num_gpus=pg.env.world_size, peak=cfg.logging.peak_flops, precision=cfg.parallel.precision)
    if est is not None:
        record["mfu"] = est
    scalars.update(routing)  # empty but on rank 0's routing steps
    return record, scalars, finite


def evaluate(run, state, record: dict, scalars: dict) -> None:
    """Collective: the validation loss into the step's record and scalars, and into the state (meta)."""
    from training.metrics import valid_metrics
    from training.validation import run_validation, update_valid_state
    result = run_validation(run.engine, run.valid_data, run.cfg.logging.eval_batches, run.pg)
    mcfg = run.model_cfg
    valid_record, valid_scalars = valid_metrics(result, mcfg.num_codebooks, mcfg.codebook_loss)
    record.update(valid_record)
    scalars.update(valid_scalars)
    state.valid = update_valid_state(state.valid, state.step, result)


def log_step(run, progress, record: dict, scalars: dict, evaluated: bool) -> None:
    """Rank 0: metrics.jsonl every step, tensorboard/wandb scalars and the printed line every log_every."""
    due = record["step"] % run.cfg.logging.log_every == 0
    run.metrics.log_step(record, scalars if due or evaluated else None)
    if due:
        run.log(progress.line(record))
    if evaluated:
        run.log(progress.valid_line(record))


def save_due(step: int, last: int, every: int, preempted: bool) -> bool:
    return preempted or step == last or bool(every and step % every == 0)


def save(run, state, reason: str) -> str | None:
    """Collective: a checkpoint of this step; None when refused for lack of disk space."""
    from training.checkpoint import save as ckpt
    from training.checkpoint.client import rng_state
    client = {**state.client(), "data": run.data.state_dict(), "rng": rng_state(),
              "config": run.cfg.to_dict(), "reason": reason}
    if state.step in _fault_steps("UNIMOE_FAULT_KILL_IN_SAVE"):
        run.engine.save_checkpoint(os.path.join(run.out, ckpt.CKPT_SUBDIR), tag=ckpt.tag_name(state.step),
                                   client_state=client, save_latest=False)
        os.kill(os.getpid(), signal.SIGKILL)  # a crash after DeepSpeed wrote, before COMPLETE
    meta = {**run.meta, "step": state.step, "valid": state.valid}
    path = ckpt.save(run.engine, run.pg, run.out, state.step, client, meta, run.cfg.checkpoint)
    run.log(f"saved {path} ({reason})" if path else f"checkpoint of step {state.step} ({reason}) refused")
    return path


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


def _global_tokens(batches, pg) -> float:
    n = float(sum(int(b["valid"].sum()) for b in batches))
    return n * pg.dp


def _reduce_metrics(acc: dict, n_micro: int, pg) -> tuple[dict, dict]:
    """Over micro-batches and data-parallel ranks: 'loss', 'loss_<task>' and 'codebook/k' are summed (each
    micro-batch holds its share of the step's per-token loss, stages.StepTokens), the rest ('aux_..')
    averaged; a task that appeared on no rank gets no key."""
    from training.cluster.parallel import all_reduce_values
    keys = sorted(acc)  # the same on every rank (training.stages.step_losses)
    summed = all_reduce_values([acc[k] for k in keys] + [acc.get("_count_" + k, n_micro) for k in keys],
                               group=pg.dp_group)
    vals, counts = summed[: len(keys)], summed[len(keys):]
    mean = {k: v if k.startswith(("loss", "codebook/")) else v / c for k, v, c in zip(keys, vals, counts)
            if not k.startswith("_count_") and c > 0}  # a task absent from the whole step: no key
    record = {k: v for k, v in mean.items() if k == "loss" or k.startswith("loss_") or k.startswith("aux_")}
    scalars = {k: v for k, v in mean.items() if k not in record}
    return record, scalars

