"""GPU checks, one CUDA device (deselected by default; scripts/gpu_check.sh runs them with `pytest -m gpu`).

- The grouped GEMM: torch._grouped_mm's CUTLASS kernel (bf16, sm90/sm100) against the per-expert loop in
  fp32, outputs and all gradients, with empty and odd-sized experts.
- The MoE layer in bf16 against its fp32 copy (same bf16-representable weights and inputs, so the same
  routing), and its host syncs: exactly one per forward + backward.
- NCCL at world size 1: the expert-parallel path (real all-to-alls with splits) equals the local path with
  one host sync; DeepSpeed training steps (our engine, ZeRO-2) in bf16 against fp32, with the experts
  trainable and frozen.
The CPU tests cover the same code: test_moe_experts.py, test_moe_layer.py, test_moe_ep.py,
test_moe_deepspeed.py.
Run: .venv/bin/pytest -m gpu tests/test_gpu.py
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.bench_precision import fwd_bwd as _fwd_bwd
from benchmarks.bench_precision import layer_pair
from benchmarks.bench_precision import rel as _rel
from moe.experts import experts_path, grouped_swiglu
from moe.layer import MoELayer
from tests.distributed import run_distributed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COUNTS = [5, 0, 37, 0, 130, 1, 64, 3]  # empty, odd-sized and larger experts
D, FF = 256, 512


def _count_syncs(step) -> int:
    """Host syncs while step() runs, as reported by CUDA's sync debug mode."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_cutlass_grouped_gemm_matches_the_per_expert_loop():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(sum(COUNTS), D, device="cuda", generator=g)
    weights = [[torch.randn(FF, D, device="cuda", generator=g) * 0.05 for _ in COUNTS],
               [torch.randn(FF, D, device="cuda", generator=g) * 0.05 for _ in COUNTS],
               [torch.randn(D, FF, device="cuda", generator=g) * 0.05 for _ in COUNTS]]
    g_out = torch.randn(sum(COUNTS), D, device="cuda", generator=g)
    offs = torch.tensor(COUNTS, device="cuda").cumsum(0).to(torch.int32)
    low = [[w.bfloat16() for w in group] for group in weights]
    path, why = experts_path(x.bfloat16(), low[0], low[2])
    if path != "grouped_mm":  # gpu_check counts a skip as a failure
        pytest.skip(f"{torch.cuda.get_device_name()}: no CUTLASS grouped GEMM ({why})")
    results = {}
    for dtype in (torch.bfloat16, torch.float32):  # bf16: the CUTLASS kernel; fp32: the per-expert loop
        xi = x.to(dtype).requires_grad_()
        ws = [[w.to(dtype).requires_grad_() for w in group] for group in weights]
        out = grouped_swiglu(xi, COUNTS, offs, *ws)
        out.backward(g_out.to(dtype))
        results[dtype] = [out, xi.grad] + [w.grad for group in ws for w in group]
    for i, (a, b) in enumerate(zip(results[torch.bfloat16], results[torch.float32])):
        if b.abs().max() == 0:  # an empty expert's weight gradient
            assert a.abs().max() == 0, f"tensor {i}: an empty expert got a nonzero gradient"
        else:
            assert _rel(a, b) < 2e-2, f"tensor {i}: relative error {_rel(a, b):.3g}"


def test_moe_layer_bf16_matches_fp32_and_syncs_once():
    ref, low = layer_pair("cuda", D, FF)
    x = torch.randn(4096, D, device="cuda").bfloat16().float()
    g = torch.randn(4096, D, device="cuda")
    out_ref, aux_ref, grads_ref = _fwd_bwd(ref, x, g)
    out, aux, grads = _fwd_bwd(low, x, g)
    assert torch.equal(aux.selected, aux_ref.selected)  # fp32 gate on the same values: the same routing
    assert out.dtype == torch.bfloat16 and _rel(out, out_ref) < 2e-2
    for name, grad in grads.items():
        assert grad is not None and _rel(grad, grads_ref[name]) < 3e-2, name
    low.zero_grad(set_to_none=True)
    assert _count_syncs(lambda: _fwd_bwd(low, x, g)) == 1  # the per-expert counts, nothing else


def _ep_path_vs_local(rank, world_size):
    import torch.distributed as dist

    ref, local = layer_pair("cuda", D, FF)
    expert_parallel = MoELayer(local.cfg, ep_group=dist.new_group([0])).cuda().to(torch.bfloat16)
    expert_parallel.load_state_dict(local.state_dict())
    x, g = torch.randn(4096, D, device="cuda"), torch.randn(4096, D, device="cuda")
    out_l, aux_l, grads_l = _fwd_bwd(local, x, g)
    out_e, aux_e, grads_e = _fwd_bwd(expert_parallel, x, g)
    expert_parallel.zero_grad(set_to_none=True)
    syncs = _count_syncs(lambda: _fwd_bwd(expert_parallel, x, g))
    return {"same_routing": bool(torch.equal(aux_l.selected, aux_e.selected)), "out": _rel(out_e, out_l),
            "grads": max(_rel(grads_e[n], grads_l[n]) for n in grads_l), "syncs": syncs}


def test_nccl_world_size_1_expert_parallel_path_equals_local():
    (res,) = run_distributed(_ep_path_vs_local, world_size=1, backend="nccl")
    assert res["same_routing"]
    assert res["out"] < 1e-2 and res["grads"] < 1e-2, res  # only index_add's atomic order differs
    assert res["syncs"] == 1, res  # counts and received counts in one copy


def _model_cfg():
    from training.model import ModelConfig

    moe = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 2, "input_jitter": 0.0}
    return ModelConfig(num_layers=2, hidden_size=256, num_heads=4, ffn_hidden_size=1024, num_codebooks=4,
                       codebook_size=64, delay_pattern="musicgen", text_vocab_size=128, max_seq_len=512,
                       moe=moe)


def _batch(cfg, n=4, frames=96):
    from training.model.batch import collate

    rng = np.random.default_rng(0)
    samples = [{"id": str(i), "task": ("speech", "music")[i % 2], "text_ids": rng.integers(5, 120, size=12),
                "codes": rng.integers(0, cfg.codebook_size, size=(cfg.num_codebooks, frames))}
               for i in range(n)]
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(samples, cfg).items()}


def _train_steps(rank, world_size):
    """Three ZeRO-2 steps of a tiny MoE AudioLM (EP group of size 1) for fp32 and bf16, experts trainable
    and frozen, from the same bf16-representable weights."""
    import deepspeed
    from deepspeed.utils import groups

    from moe.deepspeed_compat import initialize
    from training.model import AudioLM
    from training.stages import optimizer_param_groups

    deepspeed.init_distributed(dist_backend="nccl")
    groups._create_expert_and_data_parallel(1)
    cfg = _model_cfg()
    batch = _batch(cfg)
    report = {}
    for freeze in (False, True):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = AudioLM(cfg, ep_group=groups._get_expert_parallel_group("ep_size_1")).cuda()
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.bfloat16().float())
            start = {k: v.clone() for k, v in model.state_dict().items()}
            stage = SimpleNamespace(stage=SimpleNamespace(freeze_experts=freeze), is_moe=True)
            opt = torch.optim.AdamW(optimizer_param_groups(model, stage), lr=1e-3)
            ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False,
                                        "reduce_scatter": True},
                  "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10 ** 9}
            engine, *_ = initialize(model=model, optimizer=opt, config=ds)
            losses = []
            for _ in range(3):
                out = engine(batch)
                loss = out.loss + 0.01 * sum(a.balance_loss for a in out.aux)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
            end = {k: v.float() for k, v in engine.module.state_dict().items()}
            gate = "layers.0.ffn.gate.weight"
            report[freeze, precision] = {
                "losses": losses, "gate_changed": not torch.equal(end[gate], start[gate]),
                "experts_unchanged": all(torch.equal(end[k], start[k]) for k in start if ".experts." in k)}
    return report


def test_training_step_bf16_matches_fp32_reference():
    (report,) = run_distributed(_train_steps, world_size=1, backend="nccl", timeout=600)
    for freeze in (False, True):
        fp32, bf16 = report[freeze, "fp32"], report[freeze, "bf16"]
        assert abs(bf16["losses"][0] - fp32["losses"][0]) < 2e-2 * fp32["losses"][0], (freeze, fp32, bf16)
        for run in (fp32, bf16):
            assert run["losses"][-1] < run["losses"][0] and run["gate_changed"], (freeze, run)
            assert run["experts_unchanged"] == freeze, (freeze, run)
