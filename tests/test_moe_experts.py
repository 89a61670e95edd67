"""The grouped experts against a per-expert reference: outputs and all gradients, fp32 and bf16, with empty
experts; both paths (the per-expert loop, and torch._grouped_mm on the stacked weights, the call a GPU makes,
which also runs on CPU). And the block-gated SwiGLU of the shared experts.

Run: .venv/bin/pytest tests/test_moe_experts.py
"""

import pytest
import torch
import torch.nn.functional as F

from moe.experts import forced_path, grouped_swiglu, swiglu

COUNTS = [5, 0, 3, 0, 7, 1]  # experts 1 and 3 get no rows
D, FF = 16, 24


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(COUNTS), D, generator=g)
    weights = [[torch.randn(FF, D, generator=g) * 0.3 for _ in COUNTS],
               [torch.randn(FF, D, generator=g) * 0.3 for _ in COUNTS],
               [torch.randn(D, FF, generator=g) * 0.3 for _ in COUNTS]]
    g_out = torch.randn(sum(COUNTS), D, generator=g)
    leaf = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return leaf(x), [[leaf(w) for w in ws] for ws in weights], g_out.to(dtype)


def _per_expert_reference(x, weights):
    """fp64, one expert at a time, straight from the SwiGLU formula."""
    out, start = [], 0
    for e, c in enumerate(COUNTS):
        xe = x[start: start + c].double()
        wg, wu, wd = (ws[e].double() for ws in weights)
        out.append(F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd))
        start += c
    return torch.cat(out)


@pytest.mark.parametrize("kernel", ["loop", "torch._grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_equals_per_expert_reference(kernel, dtype, monkeypatch):
    calls, real = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, weights, g_out = _inputs(dtype)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    with forced_path("grouped_mm" if kernel == "torch._grouped_mm" else "loop"):
        out = grouped_swiglu(x, COUNTS, offs, *weights)
    assert len(calls) == (3 if kernel == "torch._grouped_mm" else 0)  # one per projection, all experts
    out.backward(g_out)
    assert len(calls) == (3 + 3 * 2 if kernel == "torch._grouped_mm" else 0)  # backward: input + weights
    ours = [x.grad] + [w.grad for ws in weights for w in ws]

    x_ref, w_ref, _ = _inputs(dtype)
    ref = _per_expert_reference(x_ref, w_ref)
    ref.backward(g_out.double())
    theirs = [x_ref.grad] + [w.grad for ws in w_ref for w in ws]

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a is not None, f"gradient {i} missing (an empty expert still gets a zero gradient)"
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=f"gradient {i}")
    for ws in weights:  # the empty experts' weight gradients are exactly zero
        assert ws[1].grad.abs().max() == 0 and ws[3].grad.abs().max() == 0


def test_block_gates_scale_each_concatenated_swiglu():
    """The shared experts: B SwiGLUs side by side along F, block b scaled per row by block_gates[:, b]."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, D, generator=g)
    parts = [[torch.randn(FF, D, generator=g), torch.randn(FF, D, generator=g),
              torch.randn(D, FF, generator=g)] for _ in range(2)]
    gates = torch.rand(9, 2, generator=g)
    out = swiglu(x, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                 torch.cat([p[2] for p in parts], dim=1), block_gates=gates)
    expect = sum(gates[:, b: b + 1] * F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
                 for b, (wg, wu, wd) in enumerate(parts))
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


BF16 = {torch.bfloat16}


@pytest.mark.parametrize("device, capability, version, dtypes, hidden, ffn, refused", [
    ("cuda", (9, 0), "2.11.0+cu130", BF16, 2048, 2752, None),
    ("cuda", (9, 0), "2.8.0", BF16, 2048, 2752, None),
    ("cuda", (10, 0), "2.9.1", BF16, 2048, 2752, None),
    ("cuda", (9, 0), "2.11.0", BF16, 2050, 2752, "not a multiple of 8"),
    ("cuda", (9, 0), "2.11.0", BF16, 2048, 3379, "not a multiple of 8"),
    ("cuda", (9, 0), "2.11.0", {torch.bfloat16, torch.float32}, 2048, 2752, "needs bf16 for both"),
    ("cuda", (9, 0), "2.11.0", {torch.float32}, 2048, 2752, "needs bf16"),
    ("cuda", (8, 0), "2.11.0", BF16, 2048, 2752, "sm80 has no CUTLASS grouped GEMM"),
    ("cuda", (10, 0), "2.8.0", BF16, 2048, 2752, "torch 2.8.0 has no CUTLASS grouped GEMM for sm10x"),
    ("cpu", None, "2.11.0", BF16, 2048, 2752, "needs CUDA"),
])
def test_grouped_mm_guard(device, capability, version, dtypes, hidden, ffn, refused):
    from moe.experts import grouped_mm_problem

    problem = grouped_mm_problem(device, capability, version, dtypes, hidden, ffn)
    assert problem is None if refused is None else refused in problem


def test_the_path_taken_is_logged_once(capsys, monkeypatch):
    import moe.experts
    from moe.experts import experts_path

    monkeypatch.setattr(moe.experts, "_LOGGED", set())
    x, weights, _ = _inputs(torch.bfloat16)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    path, why = experts_path(x, weights[0], weights[2])
    assert path == "loop" and why == "tensors on cpu, the CUTLASS grouped GEMM needs CUDA"
    for _ in range(2):
        grouped_swiglu(x, COUNTS, offs, *weights)
    err = capsys.readouterr().err
    assert err.count("[moe] routed experts run on the per-expert loop (tensors on cpu") == 1
    with forced_path("grouped_mm"):
        assert experts_path(x, weights[0], weights[2]) == ("grouped_mm", "forced")
    with pytest.raises(ValueError, match="forced_path"):
        with forced_path("cutlass"):
            pass


def test_grouped_path_keeps_no_stacked_weights_for_backward():
    """Forward + backward through 3 expert layers (8 experts) on torch._grouped_mm: the old way kept every
    layer's stacked weights until its backward; GroupedMM keeps the per-expert weights only, so its peak is
    lower by at least two layers' stacks (the last layer's backward starts right after its forward)."""
    from benchmarks.memory import grouped_experts_memory

    m = grouped_experts_memory(tokens=256, hidden=64, ffn=64, experts=8, layers=3, device="cpu",
                               dtype=torch.float32)
    stack = m["stacked_weights_mib_per_layer"]
    assert m["peak_fwd_bwd_mib_per_expert"] <= m["peak_fwd_bwd_mib_stacked"] - 2 * stack, m
