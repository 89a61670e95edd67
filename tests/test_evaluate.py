"""The routing report equals what is recomputed by hand from raw routing decisions; eval losses.

    .venv/bin/pytest tests/test_evaluate.py
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from training.eval.routing_report import TASKS, RoutingAccumulator, routing_report


def _by_hand(decisions, num_routed):
    """Plain-Python recomputation: decisions = per layer, a list of (selected bool [N,E], task_ids [N])."""
    out = []
    for batches in decisions:
        layer = {}
        for t, task in enumerate(TASKS):
            tokens, picks, all_null = 0, None, 0
            for selected, task_ids in batches:
                for row, tid in zip(selected.tolist(), task_ids.reshape(-1).tolist()):
                    picks = picks or [0] * len(row)
                    if tid != t:
                        continue
                    tokens += 1
                    for e, s in enumerate(row):
                        picks[e] += int(s)
                    all_null += int(not any(row[:num_routed]))
            routed, total = sum(picks[:num_routed]), sum(picks)
            layer[task] = {
                "tokens": tokens,
                "load": [p / tokens if tokens else 0.0 for p in picks],
                "routed_share": [p / routed if routed else 0.0 for p in picks[:num_routed]],
                "experts_per_token": routed / tokens if tokens else 0.0,
                "null_share": (total - routed) / total if total else 0.0,
                "all_null_fraction": all_null / tokens if tokens else 0.0,
            }
        rs, rm = layer["speech"]["routed_share"], layer["music"]["routed_share"]
        layer["tv"] = 0.5 * sum(abs(a - b) for a, b in zip(rs, rm)) if any(rs) and any(rm) else 0.0
        out.append(layer)
    return out


def _check(report, expected):
    assert len(report["layers"]) == len(expected)
    for lay, exp in zip(report["layers"], expected):
        for task in TASKS:
            assert lay["tokens"][task] == exp[task]["tokens"]
            for key in ("experts_per_token", "null_share", "all_null_fraction"):
                assert math.isclose(lay[key][task], exp[task][key], abs_tol=1e-12), (key, task)
            for key in ("load", "routed_share"):
                np.testing.assert_allclose(lay[key][task], exp[task][key], atol=1e-12)
        assert math.isclose(lay["task_divergence"], exp["tv"], abs_tol=1e-12)


def test_report_matches_hand_count_on_synthetic_decisions():
    g = torch.Generator().manual_seed(0)
    num_routed, num_null, num_layers = 4, 1, 3
    acc = RoutingAccumulator(num_routed, num_null, num_layers)
    decisions = [[] for _ in range(num_layers)]
    for _ in range(2):  # two batches, summed
        for layer in range(num_layers):
            selected = torch.rand(23, num_routed + num_null, generator=g) < 0.35
            selected[3] = False
            selected[3, -1] = True  # a token that picked only the null expert
            task_ids = torch.randint(-1, 2, (23,), generator=g)  # -1 = padding, ignored
            acc.update(layer, selected, task_ids)
            decisions[layer].append((selected, task_ids))
    report = routing_report(acc.counts())
    _check(report, _by_hand(decisions, num_routed))
    assert report["experts"][-1] == "null0"
    assert 0.0 <= report["summary"]["task_divergence"] <= 1.0


def test_disjoint_experts_give_full_divergence():
    acc = RoutingAccumulator(num_routed=2, num_null=1, num_layers=1)
    selected = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    acc.update(0, selected, torch.tensor([0, 0, 1, 1]))
    lay = routing_report(acc.counts())["layers"][0]
    assert lay["task_divergence"] == 1.0
    assert lay["experts_per_token"] == {"speech": 1.0, "music": 0.5}
    assert lay["null_share"]["speech"] == 1 / 3 and lay["null_share"]["music"] == 0.5
    assert lay["all_null_fraction"] == {"speech": 0.0, "music": 0.5}


def test_report_from_real_moe_layer_matches_raw_decisions_and_moe_stats():
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, routed_ffn_size=8, shared_ffn_size=8, num_routed_experts=4,
                    num_null_experts=1, num_shared_experts=1, top_p=0.7)
    layer = MoELayer(cfg).eval()
    acc = RoutingAccumulator(cfg.num_routed_experts, cfg.num_null_experts, num_layers=1)
    decisions, stats = [[]], []
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(3, 10, 16)
            task_ids = torch.tensor([0, 1, 0])[:, None].expand(3, 10).clone()
            task_ids[2, 7:] = -1  # padding
            _, aux = layer(x, task_ids=task_ids)
            acc.update(0, aux.selected, aux.task_ids)
            decisions[0].append((aux.selected.clone(), aux.task_ids.clone()))
            stats.append(aux.stats)
    report = routing_report(acc.counts())
    _check(report, _by_hand(decisions, cfg.num_routed_experts))
    # one batch alone: the report agrees with moe/stats.py (what training logs)
    single = RoutingAccumulator(cfg.num_routed_experts, cfg.num_null_experts, num_layers=1)
    single.update(0, *decisions[0][1])
    lay = routing_report(single.counts())["layers"][0]
    for t, task in enumerate(TASKS):
        ref = stats[1]["per_task"][t]
        assert lay["tokens"][task] == ref["tokens"]
        for key in ("experts_per_token", "null_share", "all_null_fraction"):
            assert math.isclose(lay[key][task], ref[key], abs_tol=1e-6), (key, task)
        np.testing.assert_allclose(lay["load"][task], ref["load"], atol=1e-6)
        np.testing.assert_allclose(lay["routed_share"][task], ref["routed_share"], atol=1e-6)


def _tiny_moe_model():
    from training.model import AudioLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_codebooks=2, codebook_size=16,
                      delay_pattern=[0, 1], text_vocab_size=32, max_seq_len=64, moe_layers="all",
                      moe={"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1})
    return AudioLM(cfg)


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task = TASKS[i % 2]
        out.append({"id": f"s{i}", "task": task, "text_ids": rng.integers(5, 32, size=rng.integers(2, 6)),
                    "codes": rng.integers(0, 16, size=(2, int(rng.integers(4, 9))))})
    return out


def test_evaluate_model_report_equals_raw_decisions_of_the_same_batches(tmp_path):
    from training.eval.evaluate import evaluate_model, write_report
    from training.model.batch import collate

    model = _tiny_moe_model()
    reader = _samples(10)
    result = evaluate_model(model, reader, batches=3, batch_size=4)  # 10 samples: batches of 4, 4, 2
    assert result["samples"] == 10
    # recompute everything from the raw decisions and per-token losses of the same batches
    decisions = [[], []]
    num = torch.zeros(2, 2, dtype=torch.float64)
    den = torch.zeros(2, 2, dtype=torch.float64)
    with torch.no_grad():
        for start in (0, 4, 8):
            batch = collate(reader[start:start + 4], model.cfg)
            out = model(batch)
            for li, aux in enumerate(out.aux):
                decisions[li].append((aux.selected, batch["task_ids"].reshape(-1)))
            for k in range(2):
                ce = torch.nn.functional.cross_entropy(out.logits[:, :, k].flatten(0, 1).float(),
                                                       batch["labels"][:, k].flatten(), ignore_index=-100,
                                                       reduction="none").view(batch["labels"][:, k].shape)
                for t in range(2):
                    mask = (batch["labels"][:, k] != -100) & (batch["task"] == t)[:, None]
                    num[t, k] += ce[mask].double().sum()
                    den[t, k] += mask.sum()
    _check(result["routing"], _by_hand(decisions, 4))
    for t, task in enumerate(TASKS):
        per_cb = (num[t] / den[t]).tolist()
        np.testing.assert_allclose(result["loss_per_codebook"][task], per_cb, rtol=1e-6)
        assert math.isclose(result["loss_per_task"][task], sum(per_cb), rel_tol=1e-6)

    write_report(result, str(tmp_path))
    for name in ("eval.json", "routing.json", "routing_load.png", "routing_capacity.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert json.loads((tmp_path / "routing.json").read_text())["layers"][1]["layer"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    assert "routing/routing_load" in ev.Tags()["images"]
    assert "eval/loss_speech" in ev.Tags()["scalars"]


def test_validation_loss_split_over_ranks_and_summed_equals_one_pass():
    """The training loop's validation: every data-parallel rank sums its own batches, the sums are added
    over the ranks, and the result equals evaluate_model's over all the batches at once."""
    from training.eval.evaluate import evaluate_model, validation_loss
    from training.model.batch import collate

    model = _tiny_moe_model()
    reader = _samples(12)
    whole = evaluate_model(model, reader, batches=3, batch_size=4, routing=False)
    shares = [[collate(reader[0:4], model.cfg), collate(reader[8:12], model.cfg)],
              [collate(reader[4:8], model.cfg)]]
    per_rank = [validation_loss(model, model, b) for b in shares]
    assert per_rank[0]["loss"] != per_rank[1]["loss"]
    from training.eval.evaluate import LossSums

    rank_sums = []
    for batches in shares:  # what each rank hands to the all-reduce
        s = LossSums(model.cfg.num_codebooks)
        for b in batches:
            s.update(model, model(b).logits, b)
        rank_sums.append(s.values())

    def all_reduce(mine):  # rank 1's view of the sum over both ranks
        assert mine == rank_sums[1]
        return [a + b for a, b in zip(*rank_sums)]

    got = validation_loss(model, model, shares[1], sum_over_ranks=all_reduce)
    assert math.isclose(got["loss"], whole["loss"], rel_tol=1e-9)
    for task in TASKS:
        np.testing.assert_allclose(got["loss_per_codebook"][task], whole["loss_per_codebook"][task],
                                   rtol=1e-9)
        assert math.isclose(got["loss_per_task"][task], whole["loss_per_task"][task], rel_tol=1e-9)
