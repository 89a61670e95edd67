"""`unimoe bench train` in its quick modes on CPU: the JSON keys are there and the counted quantities are
right (no timing asserts). The default mode is the code `--device cuda` runs on a GPU (scripts/gpu_check.sh),
with an MFU estimate there; MFU per GPU in the trainer is tested in test_train_stages."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.train_inputs import tiny_cfg
from training.metrics import mfu
from training.model import ModelConfig
from training.model.params import train_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*flags):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "training.cli", "bench", "train", "--json", "--quick", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mfu_is_per_gpu():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, codebook_size=13, num_codebooks=2)
    one = mfu(8000.0, cfg, 100, num_gpus=1, peak=1e12)
    assert math.isclose(one, 8000.0 * train_flops_per_token(cfg, 100) / 1e12)
    assert math.isclose(mfu(8000.0, cfg, 100, num_gpus=8, peak=1e12), one / 8)
    assert mfu(8000.0, cfg, 100) is None  # CPU: no peak known


def test_fp32_on_cuda_runs_tf32_and_its_mfu_uses_the_tf32_peak(monkeypatch):
    from training.cluster.parallel import use_tf32
    from training.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert peak_flops("bf16") == 989e12 and peak_flops("fp32") == 989e12 / 2
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, codebook_size=13, num_codebooks=2)
    assert math.isclose(mfu(8000.0, cfg, 100, precision="fp32"), 2 * mfu(8000.0, cfg, 100))
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert not use_tf32("bf16") and not torch.backends.cuda.matmul.allow_tf32
        assert use_tf32("fp32") and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_bench_train_moe_vs_dense_and_recompute():
    res = _bench()
    assert res["moe_step_s"] > 0 and res["dense_step_s"] > 0 and res["tokens_per_step"] > 0
    assert res["experts_per_token"] > 0 and res["dense_equal_active_ffn_width"] > 0
    # the dense baseline runs at a multiple of 64, its time scaled to the exact width's FLOPs
    width, timed = res["dense_equal_active_ffn_width"], res["dense_timed_ffn_width"]
    assert timed % 64 == 0 and abs(timed - width) <= 32 and res["precision"] == "fp32"
    exact, rounded = (train_flops_per_token(tiny_cfg(None, f, res["layers"], res["hidden"]), res["seq_len"])
                      for f in (width, timed))
    assert math.isclose(res["dense_time_flop_scale"], exact / rounded)
    res = _bench("--recompute", "block")
    assert res["recompute"] == "block" and res["memory_kind"] == "max RSS delta"
    assert res["none_peak_mem_mb"] > 0 and res["block_peak_mem_mb"] > 0 and res["block_step_s"] > 0


@pytest.mark.timeout(300)
def test_bench_train_tp2_token_share():
    res = _bench("--tp", "2")
    assert res["moe_token_share_per_tp_rank"] == 0.5  # sequence parallel: half of the tokens per TP rank
    assert res["moe_token_share_per_tp_rank_without_sp"] == 1.0
    assert res["tp1_step_s"] > 0 and res["tp2_step_s"] > 0 and res["tp2_without_sp_step_s"] > 0
    # the experts' TP sum once per step, not once per micro-batch: (micro-batches - 1) x their fp32 grads
    saved = res["sp_allreduce_bytes_per_step_before"] - res["sp_allreduce_bytes_per_step"]
    assert saved == (res["sp_micro_batches_per_step"] - 1) * res["expert_params_per_rank"] * 4
