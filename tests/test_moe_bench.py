"""The MoE benchmark in its tiniest mode: the JSON keys are there, the dense baselines ran and nothing is
dropped (no timing asserts); its dropped-token count does count lost outputs.

Runs in a subprocess because the benchmark initialises a 1-process gloo group for DeepSpeed's MoE.
Run: .venv/bin/pytest tests/test_moe_bench.py
"""

import json
import os
import subprocess
import sys

KEYS = {"ours_tokens_per_s", "dense_equiv_tokens_per_s", "dense_linear_tokens_per_s",
        "deepspeed_topk_tokens_per_s", "ours_k2_tokens_per_s", "megatron_tokens_per_s", "overhead_vs_dense",
        "overhead_vs_dense_linear", "speedup_vs_deepspeed", "speedup_vs_megatron",
        "deepspeed_dropped_fraction", "mean_experts_per_token", "null_share", "dropped_tokens"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("from types import SimpleNamespace; from benchmarks import bench_moe; "
        "args = SimpleNamespace(json=True, quick=True, tiny=True, device='cpu', dtype='fp32'); "
        "raise SystemExit(bench_moe.run_cli(args))")


def test_bench_moe_tiny_prints_json_last():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result)
    assert result["dropped_tokens"] == 0
    assert result["ours_tokens_per_s"] > 0 and result["dense_equiv_tokens_per_s"] > 0
    assert result["deepspeed_topk_tokens_per_s"] is not None, result.get("deepspeed_error")
    assert 0.0 <= result["deepspeed_dropped_fraction"] <= 1.0
    assert result["dense_linear_tokens_per_s"] > 0 and result["overhead_vs_dense_linear"] > 0
    assert result["config"]["dtype"] == "fp32"
    assert result["one_thread_cpu_time"]["overhead_vs_dense"] > 0
    # megatron-core's MoELayer either ran or says why not
    assert result["megatron_tokens_per_s"] is not None or "cannot run" in result["megatron_error"]
    assert (result["speedup_vs_megatron"] is None) == (result["megatron_tokens_per_s"] is None)
    assert result["experts_path"]["path"] == "loop" and "cpu" in result["experts_path"]["why"]
    mem = result["grouped_memory"]
    assert mem["experts"] == 8 and mem["peak_fwd_bwd_mib_per_expert"] < mem["peak_fwd_bwd_mib_stacked"]
    assert result["failures"] == []


def test_bench_moe_exits_1_when_the_deepspeed_comparison_errors(monkeypatch, capsys):
    """In-process (no process group: both comparisons fail before they would start one)."""
    from types import SimpleNamespace

    from benchmarks import bench_moe

    def fail(*a):
        raise RuntimeError("no DeepSpeed here")

    monkeypatch.setattr(bench_moe, "_deepspeed_top2", fail)
    monkeypatch.setattr(bench_moe, "_megatron", fail)
    args = SimpleNamespace(json=True, quick=True, tiny=True, device="cpu", dtype="fp32")
    assert bench_moe.run_cli(args) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # still printed, with the reason
    assert result["deepspeed_error"] == "RuntimeError: no DeepSpeed here"
    assert result["failures"] == ["DeepSpeed's comparison errored: RuntimeError: no DeepSpeed here"]


def test_failures_name_what_a_gpu_run_must_not_do():
    from benchmarks.bench_moe import failures

    ok = {"dropped_tokens": 0, "experts_path": {"path": "grouped_mm", "why": "CUTLASS on sm90"},
          "grouped_memory": {"peak_fwd_bwd_mib_per_expert": 1.0, "peak_fwd_bwd_mib_stacked": 2.0}}
    assert failures(ok, "cuda", "bf16") == []
    loop = {**ok, "experts_path": {"path": "loop", "why": "hidden 2050 ... not a multiple of 8"}}
    assert failures(loop, "cuda", "bf16") == ["the CUTLASS grouped GEMM did not run: hidden 2050 ... not a "
                                              "multiple of 8"]
    assert failures(loop, "cpu", "fp32") == []
    assert "2 token(s) dropped" in failures({**ok, "dropped_tokens": 2}, "cuda", "bf16")[0]
    assert failures({**ok, "megatron_error": "x"}, "cpu", "fp32") == []  # megatron-core needs CUDA
    assert "megatron-core" in failures({**ok, "megatron_error": "x"}, "cuda", "bf16")[0]


def test_dropped_tokens_counts_tokens_whose_routed_outputs_went_missing(monkeypatch):
    import torch

    import moe.layer
    from benchmarks import bench_moe

    size = bench_moe.TINY
    layer = bench_moe._ours(size, torch.device("cpu"), torch.float32)
    x = torch.randn(size.tokens, size.hidden)
    assert bench_moe._dropped_tokens(layer, x) == 0
    real = moe.layer.unpermute

    def lose_second_half(out, y, token_ids, w):  # the pairs of the higher experts never come back
        half = len(token_ids) // 2
        return real(out, y[:half], token_ids[:half], w[:half])

    monkeypatch.setattr(moe.layer, "unpermute", lose_second_half)
    assert bench_moe._dropped_tokens(layer, x) > 0
