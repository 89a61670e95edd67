"""`unimoe plan`: parameter counts, memory per GPU, valid TP x EP x DP layouts.

    .venv/bin/pytest tests/test_plan.py
"""

import argparse

import pytest
import torch
import yaml

from training.cluster.plan import GiB, all_layouts, layout_problems, memory_per_gpu, parameter_split, run_cli
from training.config import load_config
from training.model import AudioLM

MOE = {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_codebooks": 2, "codebook_size": 16,
                 "text_vocab_size": 40, "max_seq_len": 32},
       "moe": {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1, "top_p": 0.7},
       "parallel": {"tp": 2, "ep": 2, "zero_stage": 2, "precision": "bf16"},
       "data": {"global_batch_size": 8},
       "stage": {"stage": 3, "init_from": ["runs/stage2"]}}


def _config(tmp_path, d, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path), load_config(str(path), list(overrides))


def _dense(d):
    d = {k: v for k, v in d.items() if k != "moe"}
    return {**d, "parallel": {**d["parallel"], "ep": 1}, "stage": {"stage": 1}}


@pytest.mark.parametrize("dense", [False, True])
def test_parameter_split_matches_a_model_built_on_meta(tmp_path, dense):
    _, cfg = _config(tmp_path, _dense(MOE) if dense else MOE)
    split = parameter_split(cfg)
    with torch.device("meta"):
        model = AudioLM(cfg.model_config())
    assert split["total"] == sum(p.numel() for p in model.parameters())
    assert split["tp_split"] + split["moe_replicated"] + split["experts"] == split["total"]
    if dense:
        assert split["experts"] == 0 and split["active_min"] == split["active_max"] == split["total"]
    else:
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert split["experts"] == experts
        assert split["active_min"] < split["active_mean"] < split["active_max"] <= split["total"]


def test_memory_follows_zero_stage_and_sharding(tmp_path):
    _, cfg = _config(tmp_path, _dense(MOE), ["parallel.precision=fp32", "parallel.tp=1"])
    n = parameter_split(cfg)["total"]
    by_stage = {}
    for stage in (0, 1, 2, 3):
        cfg.parallel.zero_stage = stage
        by_stage[stage] = memory_per_gpu(cfg, world=4, tp=1, ep=1)
    # fp32: weights 4 B, grads 4 B, Adam m + v 8 B per parameter; ZeRO shards over dp = 4
    assert by_stage[0]["weights"] == by_stage[0]["grads"] == 4 * n and by_stage[0]["optimizer"] == 8 * n
    assert by_stage[1]["optimizer"] == 2 * n and by_stage[1]["grads"] == 4 * n
    assert by_stage[2]["grads"] == n and by_stage[2]["weights"] == 4 * n
    assert by_stage[3]["weights"] == n
    totals = [by_stage[s]["total"] for s in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    # bf16 adds the fp32 master weights to the optimizer states and halves weights/grads
    cfg.parallel.precision = "bf16"
    cfg.parallel.zero_stage = 0
    m = memory_per_gpu(cfg, world=4, tp=1, ep=1)
    assert m["weights"] == 2 * n and m["optimizer"] == 12 * n


def test_experts_split_by_ep_and_the_rest_by_tp(tmp_path):
    _, cfg = _config(tmp_path, MOE, ["parallel.zero_stage=0"])
    s = parameter_split(cfg)
    for tp, ep in [(1, 1), (2, 1), (1, 4), (2, 2)]:
        m = memory_per_gpu(cfg, world=8, tp=tp, ep=ep)
        expect = s["tp_split"] / tp + s["moe_replicated"] + s["experts"] / ep
        assert m["params_per_gpu"] == pytest.approx(expect)


def test_valid_layouts(tmp_path):
    _, cfg = _config(tmp_path, MOE)
    valid = {(lay.tp, lay.ep, lay.dp) for lay in all_layouts(cfg, 8) if lay.ok}
    # heads 4 -> tp in 1,2,4 (tp=8 fails); ep | dp and ep | 4 experts; batch 8 divisible by dp
    assert valid == {(1, 1, 8), (1, 2, 8), (1, 4, 8), (2, 1, 4), (2, 2, 4), (2, 4, 4),
                     (4, 1, 2), (4, 2, 2)}
    assert any("num_heads" in p for p in layout_problems(cfg, 8, 8, 1))
    _, dense = _config(tmp_path, _dense(MOE))
    assert {(lay.tp, lay.ep) for lay in all_layouts(dense, 8) if lay.ok} == {(1, 1), (2, 1), (4, 1)}
    assert any("num_routed_experts" in p for p in layout_problems(cfg, 6, 1, 3))
    assert any("data-parallel size 3" in p for p in layout_problems(cfg, 6, 2, 2))


def _args(path, gpus, gpu_mem=80.0):
    return argparse.Namespace(config=path, gpus=gpus, gpu_mem=gpu_mem, seq_len=None, overrides=[])


def test_cli_prints_plan_and_rejects_impossible_layouts(tmp_path, capsys):
    path, _ = _config(tmp_path, MOE)
    assert run_cli(_args(path, 8)) == 0
    out = capsys.readouterr().out
    for text in ("total", "active per token min", "mean", "max", "optimizer", "activations",
                 "valid TP x EP x DP layouts for 8 GPU(s)"):
        assert text in out
    assert "*   2   2    4" in out  # the config's layout is marked

    assert run_cli(_args(path, 3)) == 2  # tp=2 does not divide 3 GPUs
    captured = capsys.readouterr()
    assert "impossible on 3 GPU(s)" in captured.out and "tp=2 does not divide 3 GPUs" in captured.out
    assert "does not work on 3 GPU(s)" in captured.err

    assert run_cli(_args(path, 8, gpu_mem=1e-6)) == 2  # a layout that cannot fit
    assert "does NOT fit" in capsys.readouterr().out

    assert run_cli(_args(str(tmp_path / "missing.yaml"), 8)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_memory_is_in_bytes_of_plausible_size(tmp_path):
    _, cfg = _config(tmp_path, MOE)
    m = memory_per_gpu(cfg, world=8, tp=2, ep=2)
    assert 0 < m["total"] < 0.1 * GiB
    assert m["micro_batch"] == 2 and m["seq_len"] == 32
