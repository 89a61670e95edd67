"""Checkpoint cost on a ~100 M parameter MoE AudioLM: 2 gloo processes, EP 2, ZeRO 2, fp32, one AdamW step.

    unimoe bench ckpt --json [--quick]

    save_s, deepspeed_save_s   our collective save (DeepSpeed's files + client files, each fsynced, the flag
                               all-reduce, COMPLETE) and `engine.save_checkpoint` alone on the same engine
    bytes_over_deepspeed       bytes of our tag / bytes DeepSpeed alone writes (target <= 1.05)
    resume.*                   a fresh pair of processes resumes the tag; per rank: `peak_rss_mb` while
                               loading (VmHWM, reset just before the load), `share_mb` = the training state
                               the rank holds after the load (its module weights + its ZeRO partition of fp32
                               master weights and AdamW moments), `peak_state_mb` = the state it held before
                               the load + what the load added at its peak (peak RSS - RSS before the load),
                               `peak_over_share` = peak_state_mb / share_mb (target <= 1.25);
                               `full_state_mb` = the whole model's weights, master weights and moments.
                               DeepSpeed's own buffers and the libraries (`rss_before_resume_mb`) are not
                               training state and are left out of the ratio.
    reshard_s                  `unimoe ckpt reshard --ep 1` of that tag, one process, offline
    resharded_resume.*         the same figures for resuming the resharded tag at EP 1
Timings are wall seconds on a shared machine; the byte and memory ratios are what the targets are about.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict

import torch

from training.cluster.ports import free_port

FULL = {"num_layers": 5, "hidden_size": 768, "num_heads": 12, "ffn_hidden_size": 3072, "max_seq_len": 512}
QUICK = {"num_layers": 2, "hidden_size": 128, "num_heads": 4, "ffn_hidden_size": 512, "max_seq_len": 256}
MOE = {"num_routed_experts": 8, "num_null_experts": 1, "num_shared_experts": 2, "top_p": 0.7}


def bench_config(model: dict, ep: int):
    from training.config import DataConfig, ParallelConfig, StageConfig, TrainConfig
    audio = {"num_codebooks": 8, "codebook_size": 1024, "text_vocab_size": 1024, "delay_pattern": "musicgen"}
    return TrainConfig(name="bench_ckpt", max_steps=1, model={**model, **audio}, moe=dict(MOE),
                       data=DataConfig(global_batch_size=2), stage=StageConfig(stage=0),
                       parallel=ParallelConfig(ep=ep, zero_stage=2, backend="gloo"))


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def build_engine(tc, pg):
    """The training's engine for `tc` (its param groups and DeepSpeed config), AdamW at lr 1e-4."""
    from moe.deepspeed_compat import initialize as initialize_engine
    from training.model import AudioLM
    from training.setup_run import deepspeed_config
    from training.stages import optimizer_param_groups
    torch.manual_seed(0)
    model = AudioLM(tc.model_config(), ep_group=pg.ep_group)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, tc), lr=1e-4)
    engine, *_ = initialize_engine(model=model, optimizer=optimizer, config=deepspeed_config(tc, pg),
                                   dist_init_required=False)
    return engine


def _layout(pg) -> dict:
    return {"world_size": pg.env.world_size, "tp": pg.tp, "ep": pg.ep, "dp": pg.dp, "zero_stage": 2,
            "precision": "fp32"}


def _share_bytes(engine) -> int:
    """Bytes of training state this rank holds: module weights, fp32 master partition, AdamW moments."""
    zopt = engine.optimizer
    module = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    master = sum(t.numel() * t.element_size() for t in zopt.single_partition_of_fp32_groups)
    moments = sum(v.numel() * v.element_size() for st in zopt.optimizer.state.values()
                  for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    return module + master + moments


def step_and_save(engine, pg, tc, work: str) -> dict:
    import torch.distributed as dist

    from benchmarks.bench_train import make_batch
    from training.checkpoint.save import save
    from training.config import CheckpointConfig
    batch = make_batch(tc.model_config(), 1, 48, seed=pg.env.rank)
    out = engine(batch)
    engine.backward(out.loss + 0.01 * sum(a.balance_loss for a in out.aux))
    engine.step()
    dist.barrier()
    t0 = time.perf_counter()
    engine.save_checkpoint(os.path.join(work, "deepspeed_alone"), tag="step_00000001", save_latest=False)
    dist.barrier()
    t1 = time.perf_counter()
    meta = {"config": tc.to_dict(), "model_config": {**asdict(tc.model_config()), "moe": dict(MOE)},
            "layout": _layout(pg), "step": 1}
    save(engine, pg, os.path.join(work, "run"), 1, {"step": 1, "skipped": 0, "nonfinite_in_row": 0,
                                                   "data": {"position": 2}, "rng": None}, meta,
         CheckpointConfig(keep_last=2))
    dist.barrier()
    return {"deepspeed_save_s": t1 - t0, "save_s": time.perf_counter() - t1}


def _resume_phase(engine, pg, run_dir: str, base_mb: float) -> dict:
    from training.checkpoint.manifest import find_checkpoint
    from training.checkpoint.resume import resume
    held, before = _share_bytes(engine) / 2**20, _rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak below is the load's
    t0 = time.perf_counter()
    resume(engine, pg, find_checkpoint(run_dir), _layout(pg))
    seconds = time.perf_counter() - t0
    peak, share = _rss_mb("VmHWM"), _share_bytes(engine) / 2**20
    state = held + peak - before
    return {"resume_s": seconds, "rss_without_model_mb": base_mb, "rss_before_resume_mb": before,
            "peak_rss_mb": peak, "held_before_mb": held, "share_mb": share, "peak_state_mb": state,
            "peak_over_share": state / share}


def _worker(rank: int, world: int, port: int, phase: str, model: dict, ep: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from training.cluster.parallel import init_parallel, shutdown
    tc = bench_config(model, ep)
    pg = init_parallel(tc.parallel)
    base = _rss_mb()
    engine = build_engine(tc, pg)
    if phase == "save":
        result = step_and_save(engine, pg, tc, work)
    else:
        result = _resume_phase(engine, pg, os.path.join(work, phase), base)
    with open(os.path.join(work, f"{phase}.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown()


def _spawn(phase: str, model: dict, ep: int, work: str) -> list[dict]:
    import torch.multiprocessing as mp
    port = free_port()
    mp.start_processes(_worker, args=(2, port, phase, model, ep, work), nprocs=2, start_method="spawn")
    return [json.load(open(os.path.join(work, f"{phase}.rank{r}.json"))) for r in range(2)]


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(quick: bool = False) -> dict:
    from training.checkpoint.reader import model_shapes
    from training.checkpoint.reshard import reshard
    model = QUICK if quick else FULL
    tc = bench_config(model, 2)
    n_params = sum(torch.Size(shape).numel() for shape, _ in model_shapes(tc.model_config()).values())
    work = tempfile.mkdtemp(prefix="unimoe-bench-ckpt-")
    try:
        saved = _spawn("save", model, 2, work)
        tag = os.path.join(work, "run", "checkpoints", "step_00000001")
        ours, alone = _dir_bytes(tag), _dir_bytes(os.path.join(work, "deepspeed_alone", "step_00000001"))
        resumed = _spawn("run", model, 2, work)
        t0 = time.perf_counter()
        reshard(os.path.join(work, "run"), os.path.join(work, "ep1"), ep=1)
        reshard_s = time.perf_counter() - t0
        resharded = _spawn("ep1", model, 1, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"params": n_params, "processes": 2, "ep": 2, "zero_stage": 2, "precision": "fp32",
            "full_state_mb": n_params * 16 / 2**20,  # fp32 weights + fp32 master + two AdamW moments
            "save_s": saved[0]["save_s"], "deepspeed_save_s": saved[0]["deepspeed_save_s"],
            "checkpoint_mb": ours / 2**20, "deepspeed_alone_mb": alone / 2**20,
            "bytes_over_deepspeed": ours / alone,
            "resume_peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in resumed],
            "resume_peak_over_share_per_rank": [r["peak_over_share"] for r in resumed],
            "resume": resumed, "reshard_s": reshard_s,
            "resharded_resume_peak_over_share_per_rank": [r["peak_over_share"] for r in resharded],
            "resharded_resume": resharded}


def run_cli(args) -> int:
    res = run(quick=args.quick)
    print(f"checkpoint of {res['params'] / 1e6:.1f} M params (EP 2, ZeRO 2, 2 processes): "
          f"{res['checkpoint_mb']:.0f} MiB, {res['bytes_over_deepspeed']:.4f} x DeepSpeed alone; save "
          f"{res['save_s']:.2f} s (DeepSpeed alone {res['deepspeed_save_s']:.2f} s); reshard to EP 1 "
          f"{res['reshard_s']:.2f} s")
    for name in ("resume", "resharded_resume"):
        for rank, r in enumerate(res[name]):
            print(f"{name} rank {rank}: peak RSS {r['peak_rss_mb']:.0f} MiB, training state at the peak "
                  f"{r['peak_state_mb']:.0f} MiB for a share of {r['share_mb']:.0f} MiB "
                  f"({r['peak_over_share']:.3f} x; full training state {res['full_state_mb']:.0f} MiB)")
    if args.json:
        print(json.dumps(res))
    return 0
