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
