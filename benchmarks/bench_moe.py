"""MoE layer throughput, forward + backward: ours (Top-P, dropless) vs a dense FFN of the same active width,
ours in fixed top-2 mode vs DeepSpeed's top-2 MoE (capacity factor 1.25) and megatron-core's MoELayer.

    unimoe bench moe --json [--quick] [--device cuda] [--dtype bf16]

Prints a few lines, then (with --json) one JSON object as the last line. All variants run on the same
inputs in one process; rounds are interleaved (ours, dense, ...) after warm-up, and each ratio is the
median of the per-round ratios (load that drifts between rounds hits all variants alike).

`overhead_vs_dense`: our time / the time of one dense SwiGLU whose width is the measured mean active
routed width plus the shared experts' width (the FLOPs the layer must spend), run through the same
function as our experts and shared experts (moe.experts.swiglu): like for like.
`overhead_vs_dense_linear`: the same against a dense SwiGLU of nn.Linear modules.
`speedup_vs_deepspeed` / `speedup_vs_megatron`: their top-2 time / ours in top-2 mode (no null, no shared).
megatron-core's MoELayer needs CUDA (its dispatcher uses CUDA streams); elsewhere its error is reported.
`dropped_tokens`: tokens whose output differs from a reference that runs every expert on every token.
`experts_path`: the path moe.experts' guard picks for our routed experts (torch._grouped_mm's CUTLASS
kernel or the per-expert loop) and why. `grouped_memory`: peak MiB of forward + backward through 4 expert
layers on the torch._grouped_mm path (forced on CPU), the old stacked weights vs GroupedMM.
`failures`: why the run does not count (a dropped token, DeepSpeed's or, on CUDA, megatron-core's
comparison erroring, bf16 on CUDA not on the CUTLASS path, GroupedMM using more memory than the stack);
the command exits 1 when there is any, after printing the JSON.
On CPU, `one_thread_cpu_time` gives the same ratios in process CPU time with one intra-op thread: the work
each variant does, robust to other processes on a shared machine (with two threads, every parallel region
of a layer with many GEMMs waits for a preempted thread when the cores are oversubscribed).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from benchmarks.memory import grouped_experts_memory
from moe.config import MoEConfig
from moe.experts import SwiGLU, expert_weights, experts_path, swiglu
from moe.layer import MoELayer
from moe.router import gate_logits, route

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    iters: int = 15  # interleaved rounds
    cpu_iters: int = 5  # rounds of the one-thread CPU-time measurement (CPU only)


QUICK = BenchSize(tokens=2048, hidden=256, ffn=256, shared_ffn=128)
TINY = BenchSize(tokens=64, hidden=32, ffn=32, shared_ffn=16, warmup=1, iters=1, cpu_iters=1)
GPU = BenchSize(tokens=16384, hidden=2048, ffn=2752, shared_ffn=1376, iters=20)  # the released widths


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _init_single_process_group(device):
    """A 1-process group (nccl on CUDA): DeepSpeed's and megatron-core's MoE layers want one."""
    if dist.is_initialized():
        return
    from training.cluster.ports import free_port

    port = free_port()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _ours(size: BenchSize, device, dtype, **kw) -> MoELayer:
    kw = {"num_shared_experts": size.shared, **kw}
    cfg = MoEConfig(hidden_size=size.hidden, routed_ffn_size=size.ffn, shared_ffn_size=size.shared_ffn,
                    num_routed_experts=size.experts, **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.gate.weight.normal_(std=size.gate_std)
    return layer.to(device, dtype).train()


class _DenseSameKernel(SwiGLU):
    """The dense FFN through the experts' own function (moe.experts.swiglu)."""

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _deepspeed_top2(size: BenchSize, device, dtype):
    import deepspeed
    from deepspeed.moe.layer import MoE

    _init_single_process_group(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    layer = MoE(hidden_size=size.hidden, expert=SwiGLU(size.hidden, size.ffn), num_experts=size.experts,
                ep_size=1, k=2, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4,
                drop_tokens=True)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.normal_(std=size.gate_std)
    layer = layer.to(device, dtype).train()
    layer.deepspeed_moe.gate.wg.float()  # its gate computes in fp32
    return layer


def _megatron(size: BenchSize, device, dtype):
    """megatron-core's MoELayer (alltoall dispatcher, top-2, dropless, SequentialMLP experts)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoE
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_single_process_group(device)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":  # megatron's CUDA RNG tracker, as its own training scripts set it up
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=size.hidden, num_attention_heads=4,
                            ffn_hidden_size=size.ffn, moe_ffn_hidden_size=size.ffn,
                            num_moe_experts=size.experts, moe_router_topk=2, gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False,
                            moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16, moe_aux_loss_coeff=0.0,
                            bias_activation_fusion=False)
    spec = get_gpt_layer_local_spec(num_experts=size.experts, moe_grouped_gemm=False)
    return MegatronMoE(cfg, spec.submodules.mlp.submodules).to(device).train()


def _dropped_tokens(layer: MoELayer, x: torch.Tensor) -> int:
    """Tokens whose output differs from every routed expert run on every token, weighted by the same
    routing (eval mode: no jitter), plus the shared experts."""
    layer.eval()
    with torch.no_grad():
        out, _ = layer(x)
        r = route(gate_logits(x, layer.gate.weight), layer.cfg)
        ref = layer._shared_experts(x, r.shared_weights).float()
        for e, expert in enumerate(layer.local_experts):
            ref += r.weights[:, e: e + 1] * expert(x).float()
    layer.train()
    err = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-6)
    return int((err > 0.1).sum())


def _time_interleaved(fns: dict, warmup: int, iters: int, device, clock=time.perf_counter):
    """Seconds (of `clock`) per call for each function, calls interleaved round by round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
    return times


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den))


def _ratios(times: dict, flop_scale: float) -> dict:
    """The JSON's ratios from per-round times (the dense variants scaled to the exact width)."""
    times = {k: [t * flop_scale for t in v] if k.startswith("dense") else v for k, v in times.items()}
    vs_k2 = {f"speedup_vs_{k.split('_')[0]}": _median_ratio(times[k], times["ours_k2"])
             if k in times else None for k in ("deepspeed_top2", "megatron_top2")}
    return {"overhead_vs_dense": _median_ratio(times["ours"], times["dense"]),
            "overhead_vs_dense_linear": _median_ratio(times["ours"], times["dense_linear"]), **vs_k2,
            "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}


def _one_thread_cpu_time(fns: dict, iters: int, flop_scale: float) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = _time_interleaved(fns, 1, iters, torch.device("cpu"), clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    return _ratios(times, flop_scale)


def _step_fn(module, x, g, unpack):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        out = unpack(module(x.detach().requires_grad_()))
        out.backward(g)

    return step


def failures(result: dict, device: str, dtype: str) -> list[str]:
    """Why a result does not count (see the module docstring); empty when it does."""
    out = []
    if result["dropped_tokens"]:
        out.append(f"{result['dropped_tokens']} token(s) dropped (the layer is dropless)")
    if "deepspeed_error" in result:
        out.append(f"DeepSpeed's comparison errored: {result['deepspeed_error']}")
    on_cuda = device.startswith("cuda")
    if on_cuda and "megatron_error" in result:
        out.append(f"megatron-core's comparison errored: {result['megatron_error']}")
    path = result["experts_path"]
    if on_cuda and dtype == "bf16" and path["path"] != "grouped_mm":
        out.append(f"the CUTLASS grouped GEMM did not run: {path['why']}")
    mem = result["grouped_memory"]
    if mem["peak_fwd_bwd_mib_per_expert"] > mem["peak_fwd_bwd_mib_stacked"]:
        out.append("GroupedMM peaked above the stacked weights it replaces")
    return out


def run(size: BenchSize = BenchSize(), device: str = "cpu", dtype: str = "fp32", with_deepspeed: bool = True,
        with_megatron: bool = True, log=print) -> dict:
    dev, dt = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    x = torch.randn(size.tokens, size.hidden, device=dev, dtype=dt)
    g = torch.randn(size.tokens, size.hidden, device=dev, dtype=dt)

    ours = _ours(size, dev, dt)
    dropped = _dropped_tokens(ours, x)
    with torch.no_grad():
        _, aux = ours(x)
    st = aux.stats
    path, why = experts_path(x, *expert_weights(ours.local_experts)[::2])
    # The dense FFN gets a GEMM-friendly width (a multiple of 64; odd widths run up to ~15% slower per FLOP
    # on CPU); its time is scaled by exact / rounded width, i.e. compared at equal FLOPs.
    width = st["experts_per_token"] * size.ffn + size.shared * size.shared_ffn
    dense_width = max(64, 64 * round(width / 64))
    flop_scale = width / dense_width
    torch.manual_seed(1)
    dense = _DenseSameKernel(size.hidden, dense_width).to(dev, dt)
    dense_linear = SwiGLU(size.hidden, dense_width).to(dev, dt)
    dense_linear.load_state_dict(dense.state_dict())
    ours_k2 = _ours(size, dev, dt, num_null_experts=0, num_shared_experts=0, min_k=2, max_k=2)
    fns = {"ours": _step_fn(ours, x, g, lambda o: o[0]), "dense": _step_fn(dense, x, g, lambda o: o),
           "dense_linear": _step_fn(dense_linear, x, g, lambda o: o),
           "ours_k2": _step_fn(ours_k2, x, g, lambda o: o[0])}

    result = {}
    ds_dropped = None
    if with_deepspeed:
        try:
            ds = _deepspeed_top2(size, dev, dt)
            fns["deepspeed_top2"] = _step_fn(ds, x.unsqueeze(0), g.unsqueeze(0), lambda o: o[0])
            with torch.no_grad():
                ds(x.unsqueeze(0))
            counts = ds.deepspeed_moe.exp_counts.float()
            cap = max(math.ceil(size.tokens / size.experts * 1.25 * 2), 4)
            ds_dropped = float((counts - cap).clamp(min=0).sum() / (2 * size.tokens))
        except Exception as e:  # reported, not hidden
            result["deepspeed_error"] = f"{type(e).__name__}: {e}"[:300]
    if with_megatron:
        try:
            step = _step_fn(_megatron(size, dev, dt), x.unsqueeze(1), g.unsqueeze(1), lambda o: o[0])
            step()  # fails here on CPU: the dispatcher needs CUDA
            fns["megatron_top2"] = step
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            result["megatron_error"] = f"megatron-core MoELayer cannot run on {device}: {msg}"[:300]
    log(f"timing {list(fns)} on {size.tokens} tokens, hidden {size.hidden}, {size.experts} experts of "
        f"{size.ffn}, {dtype} on {device}, dense-equivalent width {width:.0f} (timed at {dense_width}), "
        f"{size.iters} interleaved rounds")
    ratios = _ratios(_time_interleaved(fns, size.warmup, size.iters, dev), flop_scale)
    tps = {name: 1000 * size.tokens / ms for name, ms in ratios["median_ms"].items()}
    result.update({
        "ours_tokens_per_s": tps["ours"],
        "dense_equiv_tokens_per_s": tps["dense"],
        "dense_linear_tokens_per_s": tps["dense_linear"],
        "ours_k2_tokens_per_s": tps["ours_k2"],
        "deepspeed_topk_tokens_per_s": tps.get("deepspeed_top2"),
        "megatron_tokens_per_s": tps.get("megatron_top2"),
        **ratios,
        "deepspeed_dropped_fraction": ds_dropped,
        "mean_experts_per_token": st["experts_per_token"],
        "null_share": st["null_share"],
        "dropped_tokens": dropped,
        "dense_equiv_width": width,
        "dense_timed_width": dense_width,
        "experts_path": {"path": path, "why": why},
        "grouped_memory": grouped_experts_memory(size.tokens, size.hidden, size.ffn, size.experts, layers=4,
                                                 device=dev, dtype=dt),
        "one_thread_cpu_time": (_one_thread_cpu_time(fns, size.cpu_iters, flop_scale) if dev.type == "cpu"
                                else None),
        "config": {"tokens": size.tokens, "hidden": size.hidden, "expert_ffn": size.ffn,
                   "routed_experts": size.experts, "null_experts": 1, "shared_experts": size.shared,
                   "shared_ffn": size.shared_ffn, "top_p": 0.7, "gate_std": size.gate_std,
                   "mode": f"training (input jitter on), forward + backward, {dtype}",
                   "ours_k2": f"{size.experts} routed, 0 null, 0 shared, min_k = max_k = 2",
                   "deepspeed": "deepspeed.moe.layer.MoE k=2, capacity_factor 1.25, drop_tokens, 1 process",
                   "megatron": "megatron-core MoELayer, top-2, alltoall dispatcher, dropless, SequentialMLP",
                   "warmup": size.warmup, "iters": size.iters, "cpu_iters": size.cpu_iters,
                   "device": device, "dtype": dtype,
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                   "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    })
    return result


def run_cli(args) -> int:
    on_gpu = args.device.startswith("cuda")
    size = QUICK if args.quick else (GPU if on_gpu else BenchSize())
    if getattr(args, "tiny", False):
        size = TINY
    result = run(size, device=args.device, dtype=getattr(args, "dtype", "fp32"))
    for key in ("ours_tokens_per_s", "dense_equiv_tokens_per_s", "dense_linear_tokens_per_s",
                "ours_k2_tokens_per_s", "deepspeed_topk_tokens_per_s", "megatron_tokens_per_s",
                "overhead_vs_dense", "overhead_vs_dense_linear", "speedup_vs_deepspeed",
                "speedup_vs_megatron", "deepspeed_dropped_fraction", "mean_experts_per_token",
                "dropped_tokens"):
        print(f"{key:>30}: {result[key]}")
    for key, value in (result["one_thread_cpu_time"] or {}).items():
        if key != "median_ms":
            print(f"{key + ' (1 thread, CPU s)':>40}: {value}")
    for key in ("deepspeed_error", "megatron_error"):
        if key in result:
            print(f"{key:>30}: {result[key]}")
    print(f"{'experts_path':>30}: {result['experts_path']}")
    print(f"{'grouped_memory':>30}: {result['grouped_memory']}")
    result["failures"] = failures(result, args.device, getattr(args, "dtype", "fp32"))
    for reason in result["failures"]:
        print(f"{'FAILED':>30}: {reason}")
    if args.json:
        print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if result["failures"] else 0
