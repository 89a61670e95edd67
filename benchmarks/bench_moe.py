"""MoE layer throughput, forward + backward: ours (Top-P, dropless) vs a dense FFN of the same active width,
DeepSpeed's top-2 MoE (capacity factor 1.25), ours in fixed top-2 mode, and megatron-core's MoELayer.

    unimoe bench moe --json [--quick] [--device cuda]

Prints a few lines, then (with --json) one JSON object as the last line. All variants run on the same
inputs in one process; iterations are interleaved (ours, dense, ...) after warm-up and medians reported.
`overhead_vs_dense` = our time per token / the time per token of one dense SwiGLU FFN whose width is the
measured mean active routed width plus the shared experts' width (the physical limit of the layer).
On CPU the JSON also gives the page faults of each variant (memory glibc handed back to the kernel and
touched again: the dense FFN's large activations pay far more of it than our pieces) and, measured last,
`without_page_faults`: ours vs dense once freed memory stays in the heap, the comparison of compute only.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.config import MoEConfig
from moe.experts import SwiGLU
from moe.layer import MoELayer

try:
    import resource
except ImportError:  # not on every platform: page faults are then reported as 0
    resource = None
PAGE_MB = mmap.PAGESIZE / 2 ** 20


@dataclass
class BenchSize:
    tokens: int = 4096
    hidden: int = 512
    ffn: int = 512  # routed expert width
    experts: int = 8
    shared: int = 2
    shared_ffn: int = 256
    gate_std: float = 0.1  # router init: logits of std ~ gate_std * sqrt(hidden), a peaked, trained-like gate
    warmup: int = 2
    iters: int = 15  # interleaved wall-clock rounds; ratios are medians of per-round ratios
    cpu_iters: int = 5  # rounds of the one-thread CPU-time measurement


QUICK = BenchSize(tokens=2048, hidden=256, ffn=256, shared_ffn=128, warmup=2, iters=15)
TINY = BenchSize(tokens=64, hidden=32, ffn=32, shared_ffn=16, warmup=1, iters=1, cpu_iters=1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _init_single_process_group():
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _ours(size: BenchSize, device, **kw) -> MoELayer:
    kw = {"num_shared_experts": size.shared, **kw}
    cfg = MoEConfig(hidden_size=size.hidden, routed_ffn_size=size.ffn, shared_ffn_size=size.shared_ffn,
                    num_routed_experts=size.experts, **kw)
    layer = MoELayer(cfg).to(device)
    with torch.no_grad():
        layer.gate.weight.normal_(std=size.gate_std)
    return layer.train()


def _deepspeed_top2(size: BenchSize, device):
    import deepspeed
    from deepspeed.moe.layer import MoE

    _init_single_process_group()
    deepspeed.init_distributed(dist_backend="gloo")
    layer = MoE(hidden_size=size.hidden, expert=SwiGLU(size.hidden, size.ffn), num_experts=size.experts,
                ep_size=1, k=2, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4,
                drop_tokens=True)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.normal_(std=size.gate_std)
    return layer.to(device).train()


def _megatron(size: BenchSize, device):
    """megatron-core's MoELayer (alltoall dispatcher, top-2, dropless); raises if it cannot run here."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoE
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_single_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=size.hidden, num_attention_heads=4,
                            ffn_hidden_size=size.ffn, moe_ffn_hidden_size=size.ffn,
                            num_moe_experts=size.experts, moe_router_topk=2, gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False,
                            moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
                            params_dtype=torch.float32, moe_aux_loss_coeff=0.0, bias_activation_fusion=False)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=size.experts, moe_grouped_gemm=False)
    layer = MegatronMoE(cfg, spec.submodules.mlp.submodules).to(device)
    return layer.train()


def _dense_width(mean_experts: float, size: BenchSize) -> float:
    return mean_experts * size.ffn + size.shared * size.shared_ffn


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _time_interleaved(fns: dict, warmup: int, iters: int, device, clock=time.perf_counter,
                      faults: dict | None = None) -> dict[str, list[float]]:
    """Seconds of `clock` per call for each function, calls interleaved round by round (load drift
    hits all variants alike). `faults`, if given, receives each call's minor page faults in MB: memory
    the allocator handed back to the kernel and touched again, a cost that depends on the allocator."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _sync(device)
            f0, t0 = _minor_faults(), clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
            if faults is not None:
                faults.setdefault(name, []).append((_minor_faults() - f0) * PAGE_MB)
    return times


def _median_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios num / den: robust to load that drifts between rounds."""
    return statistics.median(n / d for n, d in zip(num, den))


def _median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _keep_freed_memory() -> str | None:
    """glibc: keep freed blocks in the heap instead of returning them to the kernel, so reused memory is
    not faulted in again. None on success, else why not. Changes the process: call it last."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        return f"no glibc ({e})"
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
          and libc.mallopt(m_top_pad, 256 << 20))
    return None if ok else "mallopt refused the settings"


def _without_page_faults(fns: dict, size: BenchSize, device, flop_scale: float) -> dict:
    """ours vs dense again once freed memory stays in the heap: the comparison without the
    allocator-dependent page-fault cost (which, with glibc's defaults, the dense FFN pays far more of)."""
    why = _keep_freed_memory()
    if why is not None:
        return {"error": why}
    faults: dict[str, list[float]] = {}
    t = _time_interleaved({k: fns[k] for k in ("ours", "dense")}, size.warmup, size.iters, device,
                          faults=faults)
    t["dense"] = [x * flop_scale for x in t["dense"]]
    return {"overhead_vs_dense": _median_ratio(t["ours"], t["dense"]), "median_ms": _median_ms(t),
            "page_faults_mb_per_step": {k: statistics.median(v) for k, v in faults.items()}}


def _cpu_time_one_thread(fns: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """Process CPU seconds per call with one intra-op thread: the work each variant does, robust to
    other processes on a shared machine (wall clock with 2 threads is not: barrier waits of the many
    small parallel regions of a MoE layer grow with oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_interleaved(fns, warmup, iters, torch.device("cpu"), clock=time.process_time)
    finally:
        torch.set_num_threads(threads)


def _step_fn(module, x, g, unpack):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_()
        out = unpack(module(xi))
        out.backward(g)

    return step


def run(size: BenchSize = BenchSize(), device: str = "cpu", with_deepspeed: bool = True,
        with_megatron: bool = True, log=print) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(size.tokens, size.hidden, device=dev)
    g = torch.randn(size.tokens, size.hidden, device=dev)

    ours = _ours(size, dev)
    with torch.no_grad():
        _, aux = ours(x)
    st = aux.stats
    # The dense FFN gets a GEMM-friendly width (multiple of 64; odd widths run up to ~15% slower per
    # FLOP on CPU) and its time is scaled by exact / rounded width, i.e. compared at equal FLOPs.
    width = _dense_width(st["experts_per_token"], size)
    dense_width = max(64, 64 * round(width / 64))
    flop_scale = width / dense_width
    dense = SwiGLU(size.hidden, dense_width).to(dev)
    ours_k2 = _ours(size, dev, num_null_experts=0, num_shared_experts=0, min_k=2, max_k=2)
    fns = {"ours": _step_fn(ours, x, g, lambda o: o[0]), "dense": _step_fn(dense, x, g, lambda o: o),
           "ours_k2": _step_fn(ours_k2, x, g, lambda o: o[0])}

    result = {"deepspeed_topk_tokens_per_s": None, "megatron_tokens_per_s": None}
    ds_dropped = None
    if with_deepspeed:
        try:
            ds = _deepspeed_top2(size, dev)
            fns["deepspeed_top2"] = _step_fn(ds, x.unsqueeze(0), g.unsqueeze(0), lambda o: o[0])
            with torch.no_grad():
                ds(x.unsqueeze(0))
            counts = ds.deepspeed_moe.exp_counts.float()
            cap = max(math.ceil(size.tokens / size.experts * 1.25 * 2), 4)
            ds_dropped = float((counts - cap).clamp(min=0).sum() / (2 * size.tokens))
        except Exception as e:  # reported, not hidden
            result["deepspeed_error"] = f"{type(e).__name__}: {e}"
    if with_megatron:
        try:
            mg = _megatron(size, dev)
            step = _step_fn(mg, x.unsqueeze(1), g.unsqueeze(1), lambda o: o[0])
            step()  # fails here on CPU if the dispatcher needs CUDA
            fns["megatron"] = step
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            result["megatron_error"] = f"megatron-core MoELayer cannot run on {device}: {msg}"[:300]
    log(f"timing {list(fns)} on {size.tokens} tokens, hidden {size.hidden}, {size.experts} experts of "
        f"{size.ffn}, dense-equivalent width {width:.0f} (timed at {dense_width}), "
        f"{size.iters} interleaved iterations")
    faults: dict[str, list[float]] = {}
    times = _time_interleaved(fns, size.warmup, size.iters, dev, faults=faults)
    times["dense"] = [t * flop_scale for t in times["dense"]]
    median_ms = _median_ms(times)
    tps = {name: 1000 * size.tokens / ms for name, ms in median_ms.items()}
    overhead = _median_ratio(times["ours"], times["dense"])
    speedup = (_median_ratio(times["deepspeed_top2"], times["ours_k2"]) if "deepspeed_top2" in times
               else None)
    cpu = {}
    if dev.type == "cpu":
        ct = _cpu_time_one_thread({k: fns[k] for k in ("ours", "dense", "ours_k2", "deepspeed_top2")
                                   if k in fns}, 1, size.cpu_iters)
        ct["dense"] = [t * flop_scale for t in ct["dense"]]
        cpu["overhead_vs_dense"] = _median_ratio(ct["ours"], ct["dense"])
        if "deepspeed_top2" in ct:
            cpu["speedup_vs_deepspeed"] = _median_ratio(ct["deepspeed_top2"], ct["ours_k2"])
        cpu["median_ms"] = _median_ms(ct)
    no_faults = _without_page_faults(fns, size, dev, flop_scale) if dev.type == "cpu" else {}

    result.update({
        "ours_tokens_per_s": tps["ours"],
        "dense_equiv_tokens_per_s": tps["dense"],
        "deepspeed_topk_tokens_per_s": tps.get("deepspeed_top2"),
        "ours_k2_tokens_per_s": tps["ours_k2"],
        "megatron_tokens_per_s": tps.get("megatron"),
        "overhead_vs_dense": overhead,
        "speedup_vs_deepspeed": speedup,
        "deepspeed_dropped_fraction": ds_dropped,
        "mean_experts_per_token": st["experts_per_token"],
        "null_share": st["null_share"],
        "dropped_tokens": 0,  # dropless by construction: every (token, routed expert) pair is computed
        "dense_equiv_width": width,
        "dense_timed_width": dense_width,
        "median_ms": median_ms,
        # freshly faulted memory per step (glibc returns large freed blocks to the kernel): part of each
        # variant's time, and allocator-dependent (jemalloc/tcmalloc or MALLOC_* settings change it)
        "page_faults_mb_per_step": {k: statistics.median(v) for k, v in faults.items()},
        "one_thread_cpu_time": cpu,
        "without_page_faults": no_faults,
        "config": {"tokens": size.tokens, "hidden": size.hidden, "expert_ffn": size.ffn,
                   "routed_experts": size.experts, "null_experts": 1, "shared_experts": size.shared,
                   "shared_ffn": size.shared_ffn, "top_p": 0.7, "gate_std": size.gate_std,
                   "mode": "training (input jitter on), forward + backward, fp32",
                   "ours_k2": f"{size.experts} routed, 0 null, 0 shared, min_k = max_k = 2",
                   "deepspeed": "deepspeed.moe.layer.MoE k=2, capacity_factor 1.25, drop_tokens, 1 process",
                   "warmup": size.warmup, "iters": size.iters, "cpu_iters": size.cpu_iters, "device": device,
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    })
    return result


def run_cli(args) -> int:
    size = QUICK if args.quick else BenchSize()
    if getattr(args, "tiny", False):
        size = TINY
    result = run(size, device=args.device)
    for key in ("ours_tokens_per_s", "dense_equiv_tokens_per_s", "ours_k2_tokens_per_s",
                "deepspeed_topk_tokens_per_s", "megatron_tokens_per_s", "overhead_vs_dense",
                "speedup_vs_deepspeed", "deepspeed_dropped_fraction", "mean_experts_per_token"):
        print(f"{key:>30}: {result[key]}")
    for key, value in result["one_thread_cpu_time"].items():
        if key != "median_ms":
            print(f"{key + ' (1 thread, CPU s)':>30}: {value}")
    if "overhead_vs_dense" in result["without_page_faults"]:
        print(f"{'overhead_vs_dense (no faults)':>30}: {result['without_page_faults']['overhead_vs_dense']}")
    for key in ("deepspeed_error", "megatron_error"):
        if key in result:
            print(f"{key:>30}: {result[key]}")
    if args.json:
        print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
