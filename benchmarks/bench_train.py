"""Training-step throughput: the tiny MoE AudioLM vs the same model with a dense FFN of equal ACTIVE
parameters, in one process on the same batch (forward + backward + AdamW step, plain torch, no DeepSpeed).

    unimoe bench train --json [--quick] [--device cuda] [--precision bf16|fp32]
    unimoe bench train --json --tp 2 | --recompute block     (benchmarks/bench_train_parallel.py)

The dense FFN width = shared experts' width + the MEASURED mean number of routed experts per token (from
the MoE's routing stats in warm-up) x the routed expert width, so both models spend the same matmul FLOPs
per token in their FFNs; `moe_over_dense_time` is then the cost of routing + dispatch + the small per-expert
GEMMs. The dense model is built with that width rounded to a multiple of 64 (an odd width such as 3379
misses the aligned GEMM kernels and would flatter the MoE) and its time is scaled by the FLOPs of the exact
width over the rounded one. Iterations are interleaved (moe, dense, moe, ...) and medians reported.
Precision: bf16 on a GPU, fp32 on CPU by default; fp32 on a GPU runs TF32 (as training does). On a GPU the
MFU estimate uses training.model.params.train_flops_per_token and the device's dense peak in that precision
(TF32: half the bf16 peak), and `*_peak_mem_gib` is the allocator's peak over one step of each model.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from benchmarks.train_inputs import make_batch, tiny_cfg
from training.cluster.parallel import use_tf32
from training.metrics import peak_flops
from training.model import AudioLM
from training.model.params import parameter_counts, train_flops_per_token


def _step(model, opt, batch, device):
    t0 = time.perf_counter()
    out = model(batch)
    loss = out.loss
    if out.aux:
        loss = loss + 0.01 * sum(a.balance_loss for a in out.aux)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _peak_mem_gib(model, opt, batch, device) -> float | None:
    """The allocator's peak over one step (CUDA only), weights and optimizer states included."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    _step(model, opt, batch, device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def run(quick: bool = False, device: str = "cpu", precision: str | None = None) -> dict:
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    precision = precision or ("bf16" if on_gpu else "fp32")
    layers, hidden, ffn = (2, 64, 256) if not on_gpu else (8, 1024, 4096)
    batch_size, frames = (4, 96) if quick else (8, 192)
    if on_gpu:
        batch_size, frames = 16, 512
    warmup, iters = (1, 3) if quick else (2, 9)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tf32 = on_gpu and use_tf32(precision)
    torch.manual_seed(0)
    moe_cfg = tiny_cfg({"num_routed_experts": 8, "num_null_experts": 1, "num_shared_experts": 2,
                        "top_p": 0.7}, ffn, layers, hidden)
    moe = AudioLM(moe_cfg).to(dev, dtype)
    batch = {k: v.to(dev) for k, v in make_batch(moe_cfg, batch_size, frames).items()}
    tokens = int(batch["valid"].sum())
    opt_m = torch.optim.AdamW(moe.parameters(), lr=1e-4)
    k_seen = []
    for _ in range(warmup):
        _, out = _step(moe, opt_m, batch, dev)
        k_seen += [a.stats["experts_per_token"] for a in out.aux]
    mean_k = float(np.mean(k_seen))
    kw = moe_cfg.moe_kwargs()
    width = int(round(kw.get("num_shared_experts", 2) * kw["shared_ffn_size"]
                      + mean_k * kw["routed_ffn_size"]))
    dense_cfg = tiny_cfg(None, max(64, 64 * round(width / 64)), layers, hidden)
    exact_cfg = tiny_cfg(None, width, layers, hidden)  # FLOPs only
    seq = batch["text"].shape[1]
    flop_scale = train_flops_per_token(exact_cfg, seq) / train_flops_per_token(dense_cfg, seq)
    dense = AudioLM(dense_cfg).to(dev, dtype)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-4)
    for _ in range(warmup):
        _step(dense, opt_d, batch, dev)
    t_moe, t_dense = [], []
    for _ in range(iters):
        t_moe.append(_step(moe, opt_m, batch, dev)[0])
        t_dense.append(_step(dense, opt_d, batch, dev)[0] * flop_scale)
    tm, td = statistics.median(t_moe), statistics.median(t_dense)
    res = {
        "device": torch.cuda.get_device_name(dev) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""), "layers": layers, "hidden": hidden, "batch": batch_size,
        "seq_len": seq, "tokens_per_step": tokens,
        "precision": precision + (" (TF32 matmuls)" if tf32 else ""),
        "experts_per_token": round(mean_k, 3), "dense_equal_active_ffn_width": width,
        "dense_timed_ffn_width": dense_cfg.ffn_hidden_size, "dense_time_flop_scale": flop_scale,
        "active_params_moe": int(parameter_counts(moe_cfg, mean_k)["active_mean"]),
        "active_params_dense": int(parameter_counts(exact_cfg)["active_mean"]),
        "moe_step_s": tm, "dense_step_s": td,
        "moe_tokens_per_s": tokens / tm, "dense_tokens_per_s": tokens / td,
        "moe_over_dense_time": tm / td,
        # the fastest iterations: less sensitive to other processes on a shared machine
        "moe_over_dense_time_min": min(t_moe) / min(t_dense),
        "iters": iters,
        "moe_peak_mem_gib": _peak_mem_gib(moe, opt_m, batch, dev),
        "dense_peak_mem_gib": _peak_mem_gib(dense, opt_d, batch, dev),
    }
    if on_gpu:
        peak = peak_flops(precision)
        if peak:
            res["peak_flops"] = peak
            res["mfu_moe"] = tokens / tm * train_flops_per_token(moe_cfg, seq, mean_k) / peak
            res["mfu_dense"] = tokens / td * train_flops_per_token(exact_cfg, seq) / peak
    return res


def run_cli(args) -> int:
    if getattr(args, "tp", None) or getattr(args, "recompute", None):
        from benchmarks.bench_train_parallel import run_recompute, run_tp
        res = (run_tp(args.tp, args.device, args.quick) if args.tp
               else run_recompute(args.recompute, args.device, args.quick))
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
        if args.json:
            print(json.dumps(res))
        return 0
    res = run(quick=args.quick, device=args.device, precision=getattr(args, "precision", None))
    print(f"train step on {res['device']} ({res['precision']}): MoE {res['moe_tokens_per_s']:.0f} tok/s, "
          f"dense (equal active, FFN "
          f"width {res['dense_equal_active_ffn_width']}) {res['dense_tokens_per_s']:.0f} tok/s, "
          f"moe_over_dense_time {res['moe_over_dense_time']:.3f} (experts/token {res['experts_per_token']})")
    if "mfu_moe" in res:
        print(f"MFU estimate: MoE {res['mfu_moe']:.3f}, dense {res['mfu_dense']:.3f}; peak memory MoE "
              f"{res['moe_peak_mem_gib']:.2f} GiB, dense {res['dense_peak_mem_gib']:.2f} GiB")
    if args.json:
        print(json.dumps(res))
    return 0
