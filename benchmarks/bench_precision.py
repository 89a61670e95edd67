"""bf16 against fp32: the MoE layer (forward + backward) and one training step of a small MoE AudioLM, from
the same bf16-representable weights and inputs, the fp32 reference with TF32 off. Each quantity is a relative
error (norm of the difference / norm of the reference) checked against a stated tolerance.

    python -m benchmarks.bench_precision [--device cuda] [--json]     (exit 1 when one is over)

The MoE layer: output, input gradient and every parameter gradient, and the routing (the fp32 gate on the
same values must route identically). The training step (plain torch AdamW, no DeepSpeed): the loss before
and after one step. scripts/gpu_check.sh runs it on the GPU; tests/test_gpu.py shares its layer pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from moe.config import MoEConfig
from moe.layer import MoELayer

TOLERANCES = {"moe_out": 2e-2, "moe_grads": 3e-2, "loss_before_step": 2e-2, "loss_after_step": 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@contextlib.contextmanager
def tf32_off():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def bf16_representable(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.bfloat16().float())


def layer_pair(device, hidden: int = 256, ffn: int = 512, experts: int = 8):
    """(fp32 layer, bf16 layer) with the same bf16-representable weights."""
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=hidden, routed_ffn_size=ffn, shared_ffn_size=ffn // 2,
                    num_routed_experts=experts, input_jitter=0.0)
    ref = MoELayer(cfg).to(device)
    with torch.no_grad():
        ref.gate.weight.normal_(std=0.1)
    bf16_representable(ref)
    low = MoELayer(cfg).to(device, torch.bfloat16)
    low.load_state_dict(ref.state_dict())
    return ref, low


def fwd_bwd(layer, x, g):
    """(output, aux, {"x": input gradient, name: parameter gradient})."""
    x = x.detach().to(next(layer.parameters()).dtype).requires_grad_()
    out, aux = layer(x)
    out.backward(g.to(x.dtype))
    return out, aux, {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def moe_layer_check(device, tokens: int = 4096, hidden: int = 256) -> dict:
    ref, low = layer_pair(device, hidden)
    x = torch.randn(tokens, hidden, device=device).bfloat16().float()
    g = torch.randn(tokens, hidden, device=device)
    with tf32_off():
        out_ref, aux_ref, grads_ref = fwd_bwd(ref, x, g)
    out, aux, grads = fwd_bwd(low, x, g)
    grad_errors = {name: rel(grad, grads_ref[name]) for name, grad in grads.items()}
    return {"same_routing": bool(torch.equal(aux.selected, aux_ref.selected)), "moe_out": rel(out, out_ref),
            "moe_grads": max(grad_errors.values()), "worst_grad": max(grad_errors, key=grad_errors.get)}


def _step_losses(model, batch, dtype) -> list[float]:
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        out = model(batch)
        loss = out.loss + 0.01 * sum(a.balance_loss for a in out.aux)
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def train_step_check(device, frames: int = 96, hidden: int = 256) -> dict:
    from benchmarks.train_inputs import make_batch, tiny_cfg
    from training.model import AudioLM

    cfg = tiny_cfg({"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 2,
                    "input_jitter": 0.0}, 4 * hidden, 2, hidden)
    batch = {k: v.to(device) for k, v in make_batch(cfg, 4, frames).items()}
    torch.manual_seed(0)
    model = AudioLM(cfg).to(device)
    bf16_representable(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with tf32_off():
        torch.manual_seed(1)
        fp32 = _step_losses(model, batch, torch.float32)
    model.load_state_dict(start)
    torch.manual_seed(1)
    bf16 = _step_losses(model, batch, torch.bfloat16)
    return {"losses_fp32": fp32, "losses_bf16": bf16,
            "loss_before_step": abs(bf16[0] - fp32[0]) / abs(fp32[0]),
            "loss_after_step": abs(bf16[1] - fp32[1]) / abs(fp32[1])}


def run(device: str = "cpu", small: bool = False) -> dict:
    """small: 512 tokens, hidden 64 (the CPU test); else 4096 tokens, hidden 256, 4 x 96 frames."""
    dev = torch.device(device)
    layer = dict(tokens=512, hidden=64) if small else {}
    step = dict(frames=32, hidden=64) if small else {}
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           **moe_layer_check(dev, **layer), **train_step_check(dev, **step), "tolerances": TOLERANCES}
    res["over_tolerance"] = [k for k, tol in TOLERANCES.items() if not res[k] <= tol]
    if not res["same_routing"]:
        res["over_tolerance"].append("same_routing")
    res["ok"] = not res["over_tolerance"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args.device)
    for k, tol in TOLERANCES.items():
        print(f"{k:>18}: {res[k]:.3g} (tolerance {tol:g})")
    print(f"{'same_routing':>18}: {res['same_routing']}")
    if args.json:
        print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
