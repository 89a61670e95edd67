"""Training-step benchmarks of the parallel options, each variant in its own fresh process(es):

    unimoe bench train --json --tp 2            # TP=2 with and without sequence parallelism, beside TP=1
    unimoe bench train --json --recompute block # peak memory and step time against recompute none

--tp N: `sp_allreduce_bytes_per_step` (and `_before`) are the bytes one rank all-reduces in a step of 4
micro-batches with sequence parallelism, the experts' gradients summed over TP once per step (before: in
every block's sum, each micro-batch); `moe_token_share_per_tp_rank` is the fraction of a step's tokens one
TP rank's MoE layers route (from the routing counts: 1/N with sequence parallelism, 1 without); step times
(median) of TP=1 on one process (the others wait) and of TP=N on N processes (gloo on CPU, NCCL on GPU),
one CPU thread each.
--recompute MODE: peak memory of a training step (CPU: max RSS minus RSS before the first step, as the
kernel reports it; GPU: allocator peak minus allocated before) and the median step time, for none and MODE.
Plain torch AdamW (no DeepSpeed): the numbers are the model's, not the engine's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.cluster.ports import free_port

MICRO_BATCHES = 4  # micro-batches per step in the all-reduce count of --tp


def _worker(rank, nprocs, port, out_dir, fn, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs))
    torch.set_num_threads(1)  # CPU: one core per process (TP=1 on one core, TP=N on N); GPU: host side only
    device = torch.device(kwargs["device"])
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=nprocs)
    try:
        torch.save(fn(rank, nprocs, **kwargs), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, nprocs: int, **kwargs) -> list:
    """Run fn(rank, nprocs, **kwargs) on nprocs fresh processes (one process group); their results."""
    with tempfile.TemporaryDirectory(prefix="unimoe-bench-") as out_dir:
        mp.start_processes(_worker, args=(nprocs, free_port(), out_dir, fn, kwargs), nprocs=nprocs,
                           start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]


def _model_and_batch(device, quick, recompute="none", cpu_layers=4):
    from benchmarks.train_inputs import make_batch, tiny_cfg
    from training.model import AudioLM
    on_gpu = device.type == "cuda"
    layers, hidden, ffn = (8, 1024, 4096) if on_gpu else (cpu_layers, 128, 512)
    batch_size, frames = (16, 512) if on_gpu else ((4, 96) if quick else (8, 160))
    moe = {"num_routed_experts": 8, "num_null_experts": 1, "num_shared_experts": 2, "top_p": 0.7}
    cfg = dataclasses.replace(tiny_cfg(moe, ffn, layers, hidden), recompute=recompute)
    torch.manual_seed(0)
    model = AudioLM(cfg).to(device, torch.bfloat16 if on_gpu else torch.float32).train()
    batch = {k: v.to(device) for k, v in make_batch(cfg, batch_size, frames).items()}
    return model, batch


def _timed_steps(model, batch, iters, warmup, group=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, out = [], None
    for i in range(warmup + iters):
        if group is not None:
            dist.barrier(group)
        t0 = time.perf_counter()
        out = model(batch)
        (out.loss + 0.01 * sum(a.balance_loss for a in out.aux)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if batch["text"].is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _tp_variant(device, quick, tp_group=None, sequence_parallel=False):
    from training.model.tensor_parallel import parallelize
    model, batch = _model_and_batch(device, quick)
    if tp_group is not None:
        parallelize(model, tp_group, sequence_parallel=sequence_parallel)
    step_s, out = _timed_steps(model, batch, iters=3 if quick else 6, warmup=1, group=tp_group)
    routed = sum(a.selected.shape[0] for a in out.aux)
    return {"step_s": step_s, "share": routed / (batch["text"].numel() * len(out.aux)),
            "tokens": int(batch["valid"].sum())}


@contextlib.contextmanager
def counting_all_reduce():
    """{"bytes": n}: what every torch.distributed.all_reduce call inside the block sends (patched)."""
    counter = {"bytes": 0, "calls": 0}
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        counter["calls"] += 1
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield counter
    finally:
        dist.all_reduce = original


def _sp_allreduce(device, quick, tp_group, defer: bool, micro_batches: int) -> dict:
    """All-reduce traffic of one step of `micro_batches` forward/backward passes under sequence parallelism:
    experts summed over TP in every block's sum (defer False, the old path) or once per step (True)."""
    from deepspeed.moe.utils import is_moe_param

    from moe.expert_grads import sum_over_group
    from training.model.tensor_parallel import parallelize
    model, batch = _model_and_batch(device, quick)
    parallelize(model, tp_group, sequence_parallel=True, defer_expert_grads=defer)
    with counting_all_reduce() as counter:
        for _ in range(micro_batches):
            out = model(batch)
            (out.loss + 0.01 * sum(a.balance_loss for a in out.aux)).backward()
        if defer:
            sum_over_group([p.grad for p in model.parameters() if is_moe_param(p) and p.grad is not None],
                           tp_group)
    counter["expert_params"] = sum(p.numel() for p in model.parameters() if is_moe_param(p))
    return counter


def _tp_run(rank, nprocs, device, quick):
    """Rank 0 alone runs TP=1 (the others wait), then all ranks TP=nprocs with and without SP."""
    from megatron.core import parallel_state as ps
    device = torch.device(device)
    out = {"tp1": _tp_variant(device, quick) if rank == 0 else None}
    if nprocs > 1:
        dist.barrier()
        ps.initialize_model_parallel(tensor_model_parallel_size=nprocs)
        group = ps.get_tensor_model_parallel_group()
        out["sp"] = _tp_variant(device, quick, group, sequence_parallel=True)
        out["no_sp"] = _tp_variant(device, quick, group, sequence_parallel=False)
        for defer in (False, True):
            out[f"sp_allreduce_defer_{defer}"] = _sp_allreduce(device, quick, group, defer, MICRO_BATCHES)
    return out


def run_tp(tp: int, device: str = "cpu", quick: bool = False) -> dict:
    ranks = spawn(_tp_run, tp, device=device, quick=quick)
    one = ranks[0]["tp1"]
    res = {"mode": "tp", "device": device, "tp": tp, "tokens_per_step": one["tokens"], "threads_per_rank": 1,
           "tp1_step_s": one["step_s"], "moe_token_share_per_tp_rank": one["share"]}
    if tp == 1:
        return res
    sp, no_sp = [r["sp"] for r in ranks], [r["no_sp"] for r in ranks]
    res.update({"moe_token_share_per_tp_rank": max(r["share"] for r in sp),
                "moe_token_share_per_tp_rank_without_sp": max(r["share"] for r in no_sp),
                f"tp{tp}_step_s": max(r["step_s"] for r in sp),
                f"tp{tp}_without_sp_step_s": max(r["step_s"] for r in no_sp)})
    res[f"tp{tp}_over_tp1_time"] = res[f"tp{tp}_step_s"] / one["step_s"]
    # all-reduce bytes per rank and step (SP, MICRO_BATCHES micro-batches): experts summed over TP in every
    # block and micro-batch (before) vs once per step after the data-parallel reduction (after)
    before, after = ranks[0]["sp_allreduce_defer_False"], ranks[0]["sp_allreduce_defer_True"]
    res.update({"sp_micro_batches_per_step": MICRO_BATCHES,
                "sp_allreduce_bytes_per_step_before": before["bytes"],
                "sp_allreduce_bytes_per_step": after["bytes"],
                "sp_allreduce_calls_per_step_before": before["calls"],
                "sp_allreduce_calls_per_step": after["calls"],
                "expert_params_per_rank": after["expert_params"]})
    res["sp_over_no_sp_time"] = res[f"tp{tp}_step_s"] / res[f"tp{tp}_without_sp_step_s"]
    return res


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _recompute_run(rank, nprocs, device, quick, recompute):
    device = torch.device(device)
    model, batch = _model_and_batch(device, quick, recompute, cpu_layers=8)  # blocks dominate the memory
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        before = _rss_mb()
    step_s, _ = _timed_steps(model, batch, iters=3 if quick else 5, warmup=1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"step_s": step_s, "peak_mem_mb": peak - before, "tokens": int(batch["valid"].sum())}


def run_recompute(mode: str, device: str = "cpu", quick: bool = False) -> dict:
    base = spawn(_recompute_run, 1, device=device, quick=quick, recompute="none")[0]
    res = {"mode": "recompute", "device": device, "recompute": mode, "tokens_per_step": base["tokens"],
           "none_step_s": base["step_s"], "none_peak_mem_mb": base["peak_mem_mb"],
           "memory_kind": "allocator peak" if device.startswith("cuda") else "max RSS delta"}
    if mode != "none":
        other = spawn(_recompute_run, 1, device=device, quick=quick, recompute=mode)[0]
        res.update({f"{mode}_step_s": other["step_s"], f"{mode}_peak_mem_mb": other["peak_mem_mb"],
                    f"{mode}_over_none_time": other["step_s"] / base["step_s"],
                    f"{mode}_over_none_peak_mem": other["peak_mem_mb"] / base["peak_mem_mb"]})
    return res
