"""`unimoe plan --config C --gpus N [--gpu-mem GiB]`: what a job needs before it is submitted.

Prints the parameter count (total; active per token min/mean/max under Top-P routing), the memory per
GPU of the config's layout (weights, gradients, Adam states, activations) for its ZeRO stage, and the
valid TP x EP x DP layouts for N GPUs, each with its memory per GPU. Exits 2 with the reasons when the
config's layout is impossible on N GPUs.

Memory model (per GPU, rough; framework overhead, fragmentation and communication buffers come on top):
  - parameters outside the MoE FFNs are split by TP; the MoE layer runs replicated on every TP rank, so
    gates and shared experts are replicated, routed experts are split by EP (each rank holds
    num_routed_experts / EP of them);
  - bytes per parameter: weights and gradients 2 (bf16) or 4 (fp32); Adam m and v 4 + 4, plus an fp32
    master copy of the weights 4 under bf16;
  - ZeRO shards over the data-parallel group (dense parameters: DP = N / TP; expert parameters: the
    expert-data-parallel group DP / EP): stage 1 the optimizer states, stage 2 also the gradients,
    stage 3 also the weights;
  - activations of one micro-batch without activation checkpointing, after Korthikanti et al. 2022
    with fused attention: per layer s*b*D*(10 + 24/TP) bytes at 16 bit (x2 at fp32), plus the fp32
    logits of the K codebook heads and their gradient, split by TP (vocab-parallel).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from training.config import ConfigError, TrainConfig, divisors, load_config

GiB = 1024**3
_COLUMNS = ("weights", "grads", "optim", "activ", "total")


@dataclass
class Layout:
    tp: int
    ep: int
    dp: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def layout_problems(cfg: TrainConfig, world: int, tp: int, ep: int) -> list[str]:
    """Why TP=tp, EP=ep cannot run on `world` GPUs with this config (empty list: it can)."""
    problems = []
    if world % tp:
        return [f"tp={tp} does not divide {world} GPUs"]
    dp = world // tp
    mcfg = cfg.model_config()
    if mcfg.num_heads % tp:
        problems.append(f"tp={tp} does not divide model.num_heads={mcfg.num_heads}")
    if mcfg.num_kv_heads % tp:
        problems.append(f"tp={tp} does not divide model.num_kv_heads={mcfg.num_kv_heads}")
    if dp % ep:
        problems.append(f"ep={ep} does not divide the data-parallel size {dp} (= {world} GPUs / tp {tp})")
    if mcfg.is_moe:
        n_routed = int(mcfg.moe_kwargs().get("num_routed_experts", 8))
        if n_routed % ep:
            problems.append(f"ep={ep} does not divide moe.num_routed_experts={n_routed}")
    elif ep != 1:
        problems.append(f"ep={ep} needs an MoE model (this one is dense)")
    gbs = cfg.data.global_batch_size
    if gbs % dp:
        problems.append(f"data.global_batch_size={gbs} is not divisible by the data-parallel size {dp}")
    elif cfg.data.micro_batch_size and (gbs // dp) % cfg.data.micro_batch_size:
        problems.append(f"data.micro_batch_size={cfg.data.micro_batch_size} does not divide the per-rank "
                        f"batch {gbs // dp}")
    return problems


def all_layouts(cfg: TrainConfig, world: int) -> list[Layout]:
    """Every tp | world and ep | dp (ep = 1 only for a dense model), with why each one fails."""
    out = []
    moe = cfg.model_config().is_moe
    for tp in divisors(world):
        dp = world // tp
        for ep in divisors(dp) if moe else [1]:
            out.append(Layout(tp, ep, dp, layout_problems(cfg, world, tp, ep)))
    return out


def parameter_split(cfg: TrainConfig) -> dict:
    """Parameter counts by how they are placed: split by TP, replicated (MoE gate + shared), experts."""
    from training.model.params import parameter_counts

    mcfg = cfg.model_config()
    counts = parameter_counts(mcfg)
    n_moe = len(mcfg.moe_layer_ids)
    experts = replicated = 0
    if n_moe:
        kw = mcfg.moe_kwargs()
        n_routed = int(kw.get("num_routed_experts", 8))
        n_dyn = n_routed + int(kw.get("num_null_experts", 1))
        n_shared = int(kw.get("num_shared_experts", 2))
        D = mcfg.hidden_size
        experts = n_moe * n_routed * counts["routed_expert"]
        replicated = n_moe * ((n_dyn + n_shared) * D + n_shared * 3 * D * int(kw["shared_ffn_size"]))
    return {**counts, "experts": experts, "moe_replicated": replicated,
            "tp_split": counts["total"] - experts - replicated}


def memory_per_gpu(cfg: TrainConfig, world: int, tp: int, ep: int, seq_len: int | None = None) -> dict:
    """Bytes per GPU: weights, grads, optimizer, activations, total (see the module docstring)."""
    split = parameter_split(cfg)
    mcfg = cfg.model_config()
    dp = world // tp
    edp = max(dp // ep, 1)
    stage = cfg.parallel.zero_stage
    bf16 = cfg.parallel.precision == "bf16"
    w_bytes = 2 if bf16 else 4
    opt_bytes = 8 + (4 if bf16 else 0)

    dense = split["tp_split"] / tp + split["moe_replicated"]
    experts = split["experts"] / ep

    def sharded(n_bytes: float, zero_from: int) -> float:
        if stage >= zero_from:
            return n_bytes * (dense / dp + experts / edp)
        return n_bytes * (dense + experts)

    seq_len = seq_len or mcfg.max_seq_len
    micro = cfg.micro_batch_size(dp)
    act_scale = 1 if bf16 else 2
    tokens = micro * seq_len
    layers = tokens * mcfg.hidden_size * (10 + 24 / tp) * act_scale * mcfg.num_layers
    logits = 2 * tokens * mcfg.num_codebooks * mcfg.padded_audio_vocab_size * 4 / tp
    mem = {"weights": sharded(w_bytes, 3), "grads": sharded(w_bytes, 2), "optimizer": sharded(opt_bytes, 1),
           "activations": layers + logits, "micro_batch": micro, "seq_len": seq_len,
           "params_per_gpu": dense + experts}
    mem["total"] = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"]
    return mem


def _fmt_params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def report(cfg: TrainConfig, world: int, gpu_mem: float, seq_len: int | None, name: str) -> tuple[str, bool]:
    """The plan as text, and whether the config's own layout is possible (and fits)."""
    split = parameter_split(cfg)
    mcfg = cfg.model_config()
    p = cfg.parallel
    lines = [f"plan for {name} on {world} GPU(s) of {gpu_mem:g} GiB  (ZeRO {p.zero_stage}, {p.precision})",
             "", "parameters"]

    def row(label: str, n: float, note: str = "") -> None:
        lines.append(f"  {label:<20} {_fmt_params(n):>10}  {note}".rstrip())

    row("total", split["total"], f"({split['total']:,})")
    if mcfg.is_moe:
        lo, hi = split["routed_per_token_min"], split["routed_per_token_max"]
        row("active per token min", split["active_min"], f"({lo} routed expert(s))")
        row("                mean", split["active_mean"],
            f"({(lo + hi) / 2:g}, midpoint: the measured experts/token of a run is better)")
        row("                max", split["active_max"], f"({hi} routed expert(s))")
        row("routed experts", split["experts"], f"in {len(mcfg.moe_layer_ids)} MoE layer(s)")
    else:
        row("active per token", split["active_max"], "(dense)")
    row("embeddings + heads", split["embedding"] + split["heads"])

    layouts = all_layouts(cfg, world)
    chosen = layout_problems(cfg, world, p.tp, p.ep)
    ok = not chosen
    lines += ["", f"memory per GPU for the config's layout tp={p.tp} ep={p.ep} (GiB)"]
    if chosen:
        lines.append("  impossible on %d GPU(s): %s" % (world, "; ".join(chosen)))
    else:
        m = memory_per_gpu(cfg, world, p.tp, p.ep, seq_len)
        lines.append(f"  dp={world // p.tp}  micro-batch {m['micro_batch']} x {m['seq_len']} tokens, "
                     f"{_fmt_params(m['params_per_gpu'])} parameters per GPU")
        for key in ("weights", "grads", "optimizer", "activations", "total"):
            lines.append(f"  {key:<12} {_gib(m[key]):>9}")
        if m["total"] > gpu_mem * GiB:
            ok = False
            lines.append(f"  does NOT fit in {gpu_mem:g} GiB: raise zero_stage, tp or ep, lower "
                         "data.micro_batch_size, or use more GPUs (layouts below)")
    lines += ["", f"valid TP x EP x DP layouts for {world} GPU(s) (GiB per GPU; * = the config's)",
              f"  {'tp':>3} {'ep':>3} {'dp':>4} " + " ".join(f"{h:>8}" for h in _COLUMNS)]
    valid = [lay for lay in layouts if lay.ok]
    for lay in valid:
        m = memory_per_gpu(cfg, world, lay.tp, lay.ep, seq_len)
        mark = "*" if (lay.tp, lay.ep) == (p.tp, p.ep) else " "
        fits = "" if m["total"] <= gpu_mem * GiB else "  does not fit"
        gib = " ".join(f"{_gib(m[k]):>8}" for k in ("weights", "grads", "optimizer", "activations", "total"))
        lines.append(f"{mark} {lay.tp:>3} {lay.ep:>3} {lay.dp:>4} {gib}{fits}")
    if not valid:
        lines.append("  none; what rules them out:")
        lines += [f"    {pr}" for pr in sorted({pr for lay in layouts for pr in lay.problems})]
        ok = False
    lines.append("  (TP is best kept inside a node: tp <= GPUs per node; EP may span nodes)")
    return "\n".join(lines), ok


def run_cli(args) -> int:
    if args.gpus < 1:
        print(f"unimoe plan: error: --gpus must be >= 1, got {args.gpus}", file=sys.stderr)
        return 2
    if not math.isfinite(args.gpu_mem) or args.gpu_mem <= 0:
        print(f"unimoe plan: error: --gpu-mem must be > 0 GiB, got {args.gpu_mem}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, getattr(args, "overrides", None) or [])
        text, ok = report(cfg, args.gpus, args.gpu_mem, getattr(args, "seq_len", None), args.config)
    except (ConfigError, ValueError) as e:
        print(f"unimoe plan: error: {args.config}: {e}", file=sys.stderr)
        return 2
    print(text)
    if not ok:
        p = cfg.parallel
        print(f"unimoe plan: error: the layout tp={p.tp} ep={p.ep} of {args.config} does not work on "
              f"{args.gpus} GPU(s) of {args.gpu_mem:g} GiB (see above); pick one of the valid layouts "
              "(parallel.tp=.. parallel.ep=..)", file=sys.stderr)
        return 2
    return 0
