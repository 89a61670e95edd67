"""`unimoe plan --config C [--gpus N] [--gpu TYPE] [--json]`: which layout to submit, before submitting it.
N and TYPE default to the config's target (`cluster.gpus`, `cluster.gpu`; TYPE in any case).

Prints the parameter count (total; active per token under Top-P routing), the assumptions, and every valid
TP x EP x DP layout for N GPUs with its memory per GPU (weights, gradients, optimizer states, activations
with `model.recompute`, all-to-all buffers, a fixed overhead; training/cluster/plan_memory.py) and its
step time, tokens/s and MFU from a roofline model (training/cluster/plan_time.py), fastest first among the
layouts that fit. `--calibrate RUN` rescales the step times so that the model reproduces a real run's
tokens/s (RUN/metrics.jsonl) at its layout, and uses the run's measured routed experts per token; a run of
another model size, precision or device is refused, naming what differs.
Exits 2 with the reasons when the config's own layout is impossible on N GPUs or does not fit, and with what
fits instead, each change planned (training/cluster/plan_fit.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass

from training.cluster.gpus import GPUS, Hardware, device_preset, gpu_preset_name
from training.cluster.plan_fit import fit_hints
from training.cluster.plan_memory import (
    MEMORY_PARTS,
    GiB,
    Workload,
    max_routed_per_token,
    memory_per_gpu,
    parameter_split,
    workload_from_config,
)
from training.cluster.plan_time import Assumptions, Layout, mean_experts_per_token, step_time
from training.config import ConfigError, TrainConfig, divisors, load_config
from training.model.params import moe_numbers


@dataclass
class Candidate:
    layout: Layout
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def layout_problems(cfg: TrainConfig, world: int, tp: int, ep: int) -> list[str]:
    """Why TP=tp, EP=ep cannot run on `world` GPUs with this config (empty list: it can): the trainer's
    own checks (TrainConfig.layout_problems)."""
    if world % tp:
        return [f"tp={tp} does not divide {world} GPUs"]
    return cfg.layout_problems(world, tp, ep)


def all_layouts(cfg: TrainConfig, world: int) -> list[Candidate]:
    """Every tp | world and ep | dp (ep = 1 only for a dense model), with why each one fails."""
    out = []
    moe = cfg.is_moe
    for tp in divisors(world):
        dp = world // tp
        for ep in divisors(dp) if moe else [1]:
            out.append(Candidate(Layout(tp, ep, dp), layout_problems(cfg, world, tp, ep)))
    return out


def evaluate(w: Workload, lay: Layout, hw: Hardware, a: Assumptions) -> dict:
    mem = memory_per_gpu(w, lay.world, lay.tp, lay.ep, a.overhead_gib)
    return {"tp": lay.tp, "ep": lay.ep, "dp": lay.dp, "memory": mem, "time": step_time(w, lay, hw, a),
            "fits": mem["total"] <= hw.memory_gib * GiB}


# ---------------------------------------------------------------------------------------------- calibrate
def _run_meta(run_dir: str) -> dict:
    from training.checkpoint.manifest import find_checkpoint, read_meta
    tag = find_checkpoint(run_dir)
    if tag is None:
        raise ConfigError(f"--calibrate {run_dir}: no complete checkpoint there, so the run's layout (GPUs, "
                          "tp, ep) is unknown; calibrate with a run that saved at least once")
    return read_meta(tag)


_SIZE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "num_codebooks",
                "codebook_size")


def run_differences(run_model, run_precision: str, run_device: str | None, w: Workload,
                    hw: Hardware) -> list[str]:
    """What makes a run's tokens/s say nothing about this plan: another model size, precision or device."""
    def shape(m) -> dict:
        d = {k: getattr(m, k) for k in _SIZE_FIELDS}
        if m.is_moe:
            d.update({f"moe {k}": v for k, v in moe_numbers(m).items() if k in ("routed", "null", "shared")})
        return d

    out = []
    ran, planned = shape(run_model), shape(w.model)
    fields = [f"{k} {ran.get(k)} vs {planned.get(k)}" for k in {**ran, **planned}
              if ran.get(k) != planned.get(k)]
    if fields:
        out.append(f"model ({', '.join(fields)}; {_fmt_params(parameter_split(run_model)['total'])} vs "
                   f"{_fmt_params(parameter_split(w.model)['total'])} parameters)")
    if run_precision != w.precision:
        out.append(f"precision ({run_precision} vs {w.precision})")
    if run_device is None:
        out.append(f"device (not recorded in the run's checkpoint, which is older than the record; the "
                   f"plan is for {hw.name})")
    elif device_preset(run_device) != hw.name:
        out.append(f"device ({run_device} vs {hw.name})")
    return out


def calibrate(run_dir: str, hw: Hardware, a: Assumptions, seq_len: int | None,
              planned: Workload) -> tuple[Assumptions, dict]:
    """Assumptions whose step times reproduce the run's median tokens/s at its own layout (the first fifth of
    the steps, warm-up, left out), with the run's median routed experts per token. Refused (ConfigError
    naming what differs) when the run's model, precision or device is not the `planned` workload's."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"--calibrate {run_dir}: no metrics.jsonl (is it a `unimoe train` run dir?)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    steady = records[len(records) // 5:]
    tps = [r["tokens_per_s"] for r in steady if isinstance(r.get("tokens_per_s"), (int, float))
           and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0]
    if not tps:
        raise ConfigError(f"--calibrate {path}: no tokens_per_s in its records")
    ks = [r["experts_per_token"] for r in records if isinstance(r.get("experts_per_token"), (int, float))]
    run_cfg = load_config(os.path.join(run_dir, "config.yaml"))
    meta = _run_meta(run_dir)
    lay_d = meta["layout"]
    filled = {k: v for k, v in (meta.get("model_config") or {}).items()
              if k in ("text_vocab_size", "num_codebooks", "codebook_size")}
    run_w = workload_from_config(run_cfg, seq_len)
    run_w = dataclasses.replace(run_w, model=run_cfg.model_config(**filled))
    differ = run_differences(run_w.model, lay_d.get("precision", run_w.precision), lay_d.get("device"),
                             planned, hw)
    if differ:
        raise ConfigError(f"--calibrate {run_dir}: the run differs from this plan in " + "; ".join(differ)
                          + ": its tokens/s do not transfer, so nothing of it is applied. Calibrate with a "
                          f"run of this model in {planned.precision} on {hw.name} (a few hundred steps are "
                          "enough), or plan without --calibrate")
    lay = Layout(int(lay_d["tp"]), int(lay_d["ep"]), int(lay_d["world_size"]) // int(lay_d["tp"]))
    measured = statistics.median(tps)
    k = statistics.median(ks) if ks else None
    run_a = dataclasses.replace(a, experts_per_token=k, time_scale=1.0)
    predicted = step_time(run_w, lay, hw, run_a)["tokens_per_s"]
    scale = predicted / measured
    source = f"measured in {run_dir}" if k is not None else a.experts_source
    out = dataclasses.replace(a, time_scale=scale, experts_source=source,
                              experts_per_token=k if k is not None else a.experts_per_token)
    info = {"run": run_dir, "layout": vars(lay), "steps": len(tps), "measured_tokens_per_s": measured,
            "model_tokens_per_s": predicted, "time_scale": scale, "experts_per_token": k}
    return out, info


# ---------------------------------------------------------------------------------------------- report
def _fmt_params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _assumption_lines(w: Workload, hw: Hardware, a: Assumptions) -> list[str]:
    rows = [
        (f"GPU          {hw.name}: {hw.bf16_tflops:g} TFLOP/s bf16 dense, {hw.memory_gib:.1f} GiB, HBM "
         f"{hw.hbm_tbps:g} TB/s, {hw.gpus_per_node} per node", "--gpu, --gpu-mem, --gpus-per-node"),
        (f"matmuls      at {a.matmul_efficiency:g} of the peak (fp32 runs: TF32, half the bf16 peak)",
         "--matmul-efficiency"),
        (f"elementwise  {a.elementwise_passes:g} x the kept activation bytes at {a.hbm_efficiency:g} of HBM",
         ""),
        (f"links        NVLink {hw.intra_node_gbps:g} Gbit/s per GPU per direction, inter-node "
         f"{hw.inter_node_gbps:g} Gbit/s per GPU; collectives at {a.link_efficiency:g} of line rate",
         "--intra-node-gbps, --inter-node-gbps"),
        (f"overhead     {a.overhead_gib:g} GiB per GPU (CUDA context, NCCL buffers, allocator reserve)",
         "--overhead-gib"),
    ]
    if w.model.is_moe:
        rows.append((f"experts      routed per token: memory {max_routed_per_token(w.model)} (Top-P's max, "
                     f"balanced over EP ranks), time {mean_experts_per_token(w, a):.2f} ({a.experts_source})",
                     "--calibrate RUN"))
    overlap = ("overlapped with backward" if w.overlap_comm
               else "not overlapped (ds_config overlap_comm: false)")
    rows.append((f"ZeRO         gradient reduction {overlap}; parameter all-gather "
                 f"{'overlapped' if a.overlap_param_gather else 'not overlapped'}", ""))
    if a.time_scale != 1.0:
        rows.append((f"calibration  step times x {a.time_scale:.3f} (see below)", "--calibrate RUN"))
    return [f"  {text}" + (f"   [{flags}]" if flags else "") for text, flags in rows]


def _table_row(r: dict, mark: str) -> str:
    mem, t = r["memory"], r["time"]
    gib = " ".join(f"{mem[k] / GiB:>7.2f}" for k in MEMORY_PARTS) + f" {mem['total'] / GiB:>7.2f}"
    where = t["placement"]
    places = " ".join(f"{where[g]:>5}" for g in ("tp", "ep", "dp"))
    return (f"{mark} {r['tp']:>3} {r['ep']:>3} {r['dp']:>4} | {gib} | {t['step_s']:>8.3f} "
            f"{t['tokens_per_s']:>10.0f} {t['mfu']:>5.3f} | {places}")


def build_plan(cfg: TrainConfig, w: Workload, world: int, hw: Hardware, a: Assumptions, name: str,
               calibration: dict | None = None) -> dict:
    """Everything `unimoe plan` prints, as a dict (also the --json output); w = workload_from_config(cfg)."""
    split = parameter_split(w.model)
    p = cfg.parallel
    candidates = all_layouts(cfg, world)
    rows = [evaluate(w, c.layout, hw, a) for c in candidates if c.ok]
    for r in rows:
        r["config_layout"] = (r["tp"], r["ep"]) == (p.tp, p.ep)
    rows.sort(key=lambda r: (not r["fits"], r["time"]["step_s"]))
    chosen = layout_problems(cfg, world, p.tp, p.ep)
    mine = next((r for r in rows if r["config_layout"]), None)
    return {"config": name, "gpus": world, "gpu": dataclasses.asdict(hw),
            "target": {"gpus": cfg.cluster.gpus, "gpu": cfg.cluster.gpu},
            "assumptions": dataclasses.asdict(a),
            "workload": {"precision": w.precision, "zero_stage": w.zero_stage, "recompute": w.recompute,
                         "sequence_parallel": w.sequence_parallel, "seq_len": w.seq_len,
                         "global_batch": w.global_batch, "micro_batch": w.micro_batch},
            "parameters": split, "layouts": rows, "calibration": calibration,
            "config_layout": {"tp": p.tp, "ep": p.ep, "problems": chosen,
                              "fits": bool(mine and mine["fits"])},
            "impossible": [{"tp": c.layout.tp, "ep": c.layout.ep, "problems": c.problems}
                           for c in candidates if not c.ok]}


def report(plan: dict, w: Workload, hw: Hardware, a: Assumptions) -> str:
    split, world = plan["parameters"], plan["gpus"]
    nodes = -(-world // hw.gpus_per_node)
    wl = plan["workload"]
    target = plan["target"]
    at = ("the config's target" if (target["gpus"], target["gpu"]) == (world, hw.name) else
          f"the config's target is {target['gpus']} x {target['gpu']}" if target["gpus"]
          else "no target stated")
    lines = [f"plan for {plan['config']} on {world} x {hw.name} ({nodes} node(s); {at}): "
             f"ZeRO {wl['zero_stage']}, {wl['precision']}, recompute {wl['recompute']}, sequence parallel "
             f"{'on' if wl['sequence_parallel'] else 'off'}, {wl['seq_len']} tokens per sample, global batch "
             f"{wl['global_batch']}" + (f", micro-batch {wl['micro_batch']}" if wl["micro_batch"] else ""),
             "", "parameters"]

    def row(label: str, n: float, note: str = "") -> None:
        lines.append(f"  {label:<20} {_fmt_params(n):>10}  {note}".rstrip())

    row("total", split["total"], f"({split['total']:,})")
    if w.model.is_moe:
        lo, hi = split["routed_per_token_min"], split["routed_per_token_max"]
        row("active per token min", split["active_min"], f"({lo} routed expert(s))")
        row("                mean", split["active_mean"], f"({(lo + hi) / 2:g}, the midpoint)")
        row("                max", split["active_max"], f"({hi} routed expert(s))")
        row("routed experts", split["experts"], f"in {len(w.model.moe_layer_ids)} MoE layer(s), split by EP")
    else:
        row("active per token", split["active_max"], "(dense)")
    row("split by TP", split["tp_split"], "(attention, dense FFNs, text embedding, heads)")
    row("replicated", split["replicated"], "(norms, codebook embeddings, MoE gates and shared experts)")
    lines += ["", "assumptions (override with the flags in brackets)"] + _assumption_lines(w, hw, a)
    cal = plan["calibration"]
    if cal:
        lines.append(f"  calibrated on {cal['run']}: {cal['measured_tokens_per_s']:.0f} tokens/s measured "
                     f"over {cal['steps']} steps at tp={cal['layout']['tp']} ep={cal['layout']['ep']} "
                     f"dp={cal['layout']['dp']}, the model said {cal['model_tokens_per_s']:.0f}")
    columns = ("weights", "grads", "optim", "activ", "a2a", "overhd", "total")
    header = (f"    {'tp':>3} {'ep':>3} {'dp':>4} | " + " ".join(f"{h:>7}" for h in columns)
              + f" | {'step s':>8} {'tokens/s':>10} {'MFU':>5} | {'TP':>5} {'EP':>5} {'DP':>5}")
    fit = [r for r in plan["layouts"] if r["fits"]]
    lines += ["", f"layouts for {world} GPU(s) that fit in {hw.memory_gib:.1f} GiB, fastest first "
              "(GiB per GPU; * = the config's; TP/EP/DP: inside a node or across nodes)", header]
    lines += [_table_row(r, " *" if r["config_layout"] else "  ") for r in fit] or ["  none"]
    over = [r for r in plan["layouts"] if not r["fits"]]
    if over:
        lines += ["", "layouts that do not fit", header]
        lines += [_table_row(r, " *" if r["config_layout"] else "  ") for r in over]
    if not plan["layouts"]:
        lines.append("  no valid layout; what rules them out:")
        lines += [f"    {pr}" for pr in sorted({pr for c in plan["impossible"] for pr in c["problems"]})]
    cl = plan["config_layout"]
    if cl["problems"]:
        lines += ["", f"the config's layout tp={cl['tp']} ep={cl['ep']} is impossible on {world} GPU(s): "
                  + "; ".join(cl["problems"])]
    return "\n".join(lines)


def hardware_from_args(args, cluster=None) -> Hardware:
    """--gpu (any case) or the config's cluster.gpu, with the flags' overrides (and the config's
    cluster.gpus_per_node where --gpus-per-node is not given)."""
    name = getattr(args, "gpu", None) or (cluster.gpu if cluster else "H100-80G")
    try:
        hw = dataclasses.replace(GPUS[gpu_preset_name(name)])
    except ValueError as e:
        raise ConfigError(f"--gpu {name}: {e}") from None
    if cluster is not None:
        hw.gpus_per_node = cluster.gpus_per_node
    for flag, field in (("gpu_mem", "memory_gib"), ("intra_node_gbps", "intra_node_gbps"),
                        ("inter_node_gbps", "inter_node_gbps"), ("gpus_per_node", "gpus_per_node")):
        value = getattr(args, flag, None)
        if value is not None:
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
            setattr(hw, field, type(getattr(hw, field))(value))
    return hw


def assumptions_from_args(args) -> Assumptions:
    a = Assumptions()
    eff = getattr(args, "matmul_efficiency", None)
    if eff is not None:
        if not 0 < eff <= 1:
            raise ConfigError(f"--matmul-efficiency must be in (0, 1], got {eff}")
        a.matmul_efficiency = eff
    over = getattr(args, "overhead_gib", None)
    if over is not None:
        if not math.isfinite(over) or over < 0:
            raise ConfigError(f"--overhead-gib must be >= 0, got {over}")
        a.overhead_gib = over
    return a


def run_cli(args) -> int:
    seq_len = getattr(args, "seq_len", None)
    try:
        cfg = load_config(args.config, getattr(args, "overrides", None) or [])
        world = args.gpus if args.gpus is not None else cfg.cluster.gpus
        if world is None:
            raise ConfigError("--gpus N is needed: the config states no target (cluster.gpus)")
        if world < 1:
            raise ConfigError(f"--gpus must be >= 1, got {world}")
        hw, a = hardware_from_args(args, cfg.cluster), assumptions_from_args(args)
        w = workload_from_config(cfg, seq_len)
        calibration = None
        if getattr(args, "calibrate", None):
            a, calibration = calibrate(args.calibrate, hw, a, seq_len, w)
        plan = build_plan(cfg, w, world, hw, a, args.config, calibration)
        cl = plan["config_layout"]
        plan["hints"] = [] if cl["fits"] else fit_hints(cfg, w, world, hw, a)
    except (ConfigError, ValueError) as e:
        print(f"unimoe plan: error: {args.config}: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(plan, default=str))
    else:
        print(report(plan, w, hw, a))
    if cl["problems"] or not cl["fits"]:
        why = "does not work" if cl["problems"] else f"does not fit in {hw.memory_gib:.1f} GiB"
        hints = [f"  {h}" for h in plan["hints"]] or [
            "  none: no single change the planner tries (recompute, micro-batch, sequence length, ZeRO "
            "stage, GPUs, layout) fits; a larger GPU (--gpu) or a smaller model"]
        print(f"unimoe plan: error: the layout tp={cl['tp']} ep={cl['ep']} of {args.config} {why} on {world} "
              "GPU(s) (see above); what fits instead (each change planned):\n" + "\n".join(hints),
              file=sys.stderr)
        return 2
    return 0
