"""The planner's models against measurement: activation memory and step time.

    unimoe bench plan --json [--quick] [--device cuda]

Activation memory (CPU): the tiny MoE model of training/configs/tiny/joint.yaml (8 codebooks of 1024
codes) runs one real forward at two sequence lengths, fp32 (the tiny config's precision) and bf16 (the
paper configs'). Measured: the bytes that stay alive between forward and backward because of the
micro-batch, i.e. every storage autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
each storage counted once, parameters excluded) plus the logits the model output holds. That is the
planner's `activations_kept` exactly, op for op, and it is deterministic (no allocator caching, no
timing). `activation_predicted_over_measured` compares it with training.cluster.plan_memory, split into
the transformer layers and the output part (norm, heads, loss), which dominates at this tiny width.

On a GPU (--device cuda): a real forward + backward in bf16; measured = torch.cuda.max_memory_allocated
during the step minus the memory allocated before it (weights and their gradient buffers already exist:
one warm-up step first), compared with the planner's kept activations + backward transient.

Step time: the planner's roofline for Mixtral-8x7B at Megatron-Core's published H100 layout (see
`mixtral_reference`) against their 468 TFLOP/s per GPU.

Shipped configs: each stage config of training/configs planned at its own target (`cluster`): layout,
memory per GPU, step time and MFU (the figures README's planner table quotes).
"""

from __future__ import annotations

import json

import torch

from benchmarks.train_inputs import make_batch
from training.cluster.plan_memory import Workload, activations
from training.model import AudioLM, ModelConfig


def tiny_moe_config() -> ModelConfig:
    """The tiny joint MoE config (training/configs/tiny/joint.yaml), with the demo codec's 8 codebooks."""
    from training.config import load_config
    cfg = load_config("training/configs/tiny/joint.yaml")
    return cfg.model_config(text_vocab_size=512, num_codebooks=8, codebook_size=1024)


def measure_kept_activations(model: AudioLM, batch: dict) -> dict:
    """Bytes alive between forward and backward because of `batch` (see the module docstring), split into
    "layers" (saved inside the transformer blocks) and "head" (everything else)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    parts = {"layers": 0, "head": 0}
    where = ["head"]
    hooks = []

    def enter(mod, args):
        where.append("layers")

    def leave(mod, args, out):
        where.pop()

    for block in model.layers:
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]

    def count(t: torch.Tensor, part: str) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
            parts[part] += storage.nbytes()

    def pack(t):
        count(t, where[-1])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch)
    finally:
        for h in hooks:
            h.remove()
    count(out.logits, "head")  # held by the output until the step ends
    return {**parts, "kept": parts["layers"] + parts["head"], "output": out}


def _predicted(cfg: ModelConfig, micro: int, seq: int, precision: str) -> dict:
    w = Workload(cfg, global_batch=micro, micro_batch=micro, seq_len=seq, precision=precision)
    return activations(w, tp=1, ep=1, micro=micro)


def activation_check(frames: int, precision: str = "fp32", micro: int = 2, seed: int = 0) -> dict:
    """One forward of the tiny MoE model on CPU: measured vs predicted kept activations (bytes)."""
    cfg = tiny_moe_config()
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AudioLM(cfg).to(dtype)
    batch = make_batch(cfg, micro, frames, seed=seed)
    seq = int(batch["text"].shape[1])
    got = measure_kept_activations(model, batch)
    pred = _predicted(cfg, micro, seq, precision)
    return {"precision": precision, "micro_batch": micro, "seq_len": seq,
            "measured": {k: got[k] for k in ("layers", "head", "kept")},
            "predicted": {k: pred[k] for k in ("layers", "head", "kept")},
            "activation_predicted_over_measured": pred["kept"] / got["kept"],
            "layers_predicted_over_measured": pred["layers"] / got["layers"]}


def gpu_activation_check(frames: int, micro: int = 2) -> dict:
    """bf16 step on CUDA: max_memory_allocated over forward + backward minus what was allocated before."""
    cfg = tiny_moe_config()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = AudioLM(cfg).to(dev, torch.bfloat16)
    batch = {k: v.to(dev) for k, v in make_batch(cfg, micro, frames).items()}
    for _ in range(2):  # the second step finds every gradient buffer allocated
        model.zero_grad(set_to_none=False)
        model(batch).loss.backward()
    model.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = model(batch)
    out.loss.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    seq = int(batch["text"].shape[1])
    pred = _predicted(cfg, micro, seq, "bf16")
    return {"precision": "bf16", "device": torch.cuda.get_device_name(), "seq_len": seq, "micro_batch": micro,
            "measured_peak": measured, "predicted_peak": pred["kept"] + pred["transient"],
            "activation_predicted_over_measured": (pred["kept"] + pred["transient"]) / measured}


def shipped_targets() -> list[dict]:
    """Every shipped stage config (training/configs/*.yaml) planned at its own target (cluster.gpus x
    cluster.gpu) under the default assumptions: its layout, memory per GPU, step time and MFU."""
    import dataclasses
    import os

    from training.cluster.gpus import GPUS
    from training.cluster.plan import build_plan
    from training.cluster.plan_memory import GiB, workload_from_config
    from training.cluster.plan_time import Assumptions
    from training.config import CONFIGS_DIR, load_config

    rows = []
    for name in sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml") and f != "curriculum.yaml"):
        cfg = load_config(os.path.join(CONFIGS_DIR, name))
        c, w = cfg.cluster, workload_from_config(cfg)
        hw = dataclasses.replace(GPUS[c.gpu], gpus_per_node=c.gpus_per_node)
        mine = next(r for r in build_plan(cfg, w, c.gpus, hw, Assumptions(), name)["layouts"]
                    if r["config_layout"])
        rows.append({"config": name, "gpus": c.gpus, "gpu": c.gpu, "tp": mine["tp"], "ep": mine["ep"],
                     "dp": mine["dp"], "recompute": w.recompute, "micro_batch": mine["memory"]["micro_batch"],
                     "gib_per_gpu": mine["memory"]["total"] / GiB, "gpu_gib": hw.memory_gib,
                     "fits": mine["fits"],
                     "step_s": mine["time"]["step_s"], "tokens_per_s": mine["time"]["tokens_per_s"],
                     "mfu": mine["time"]["mfu"]})
    return rows


def run(quick: bool = False, device: str = "cpu") -> dict:
    from training.cluster.plan_time import mixtral_reference

    lengths = (48, 240) if quick else (96, 480)
    checks = [activation_check(f, p) for p in ("fp32", "bf16") for f in lengths]
    ratio = {f"cpu_{p}": [round(c["activation_predicted_over_measured"], 4) for c in checks
                          if c["precision"] == p] for p in ("fp32", "bf16")}
    res = {"activation": checks, "activation_predicted_over_measured": ratio,
           "layers_predicted_over_measured": {f"cpu_{p}": [round(c["layers_predicted_over_measured"], 4)
                                                           for c in checks if c["precision"] == p]
                                              for p in ("fp32", "bf16")}}
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = [gpu_activation_check(f) for f in (lengths[0] * 8, lengths[1] * 8)]
        res["gpu_activation"] = gpu
        ratio["gpu_bf16"] = [round(g["activation_predicted_over_measured"], 4) for g in gpu]
    ref = mixtral_reference()
    res["mixtral_8x7b_h100"] = ref
    res["shipped_configs_at_their_targets"] = shipped_targets()
    return res


def run_cli(args) -> int:
    res = run(quick=args.quick, device=args.device)
    for c in res["activation"]:
        mib = {k: c[k]["kept"] / 2**20 for k in ("measured", "predicted")}
        print(f"activations {c['precision']} seq {c['seq_len']}: measured {mib['measured']:.2f} MiB, "
              f"predicted {mib['predicted']:.2f} MiB (x{c['activation_predicted_over_measured']:.3f}; "
              f"layers x{c['layers_predicted_over_measured']:.3f})")
    for g in res.get("gpu_activation", []):
        print(f"GPU peak seq {g['seq_len']}: measured {g['measured_peak'] / 2**20:.1f} MiB, predicted "
              f"{g['predicted_peak'] / 2**20:.1f} MiB (x{g['activation_predicted_over_measured']:.3f})")
    m = res["mixtral_8x7b_h100"]
    print(f"Mixtral-8x7B on {m['gpus']} H100: predicted {m['predicted_tflops_per_gpu']:.0f} TFLOP/s per GPU, "
          f"Megatron-Core published {m['published_tflops_per_gpu']:.0f} "
          f"(x{m['predicted_over_published']:.3f})")
    for r in res["shipped_configs_at_their_targets"]:
        print(f"{r['config']} on {r['gpus']} x {r['gpu']}: tp {r['tp']} ep {r['ep']} dp {r['dp']}, recompute "
              f"{r['recompute']}, micro-batch {r['micro_batch']}: {r['gib_per_gpu']:.1f} of "
              f"{r['gpu_gib']:.1f} GiB per GPU, {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {r['mfu']:.3f}")
    if args.json:
        print(json.dumps(res))
    return 0
