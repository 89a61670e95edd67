"""Validation during training and the log line, end to end: `unimoe train` on the tiny joint MoE (one
process, EP 1) with validation every 2 steps against the same run without validation.

    .venv/bin/pytest tests/test_train_validation.py     (two 4-step runs, ~20 s on 2 idle cores)
"""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.train_runs import metrics, run, train_cmd

pytestmark = pytest.mark.timeout(600)
STEPS = ["--max-steps", "4", "parallel.ep=1"]


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    with_valid = _ok(run(train_cmd("joint.yaml", str(root / "with"), *STEPS, "logging.eval_every=2",
                                   "logging.log_every=2", nproc=1)))
    without = _ok(run(train_cmd("joint.yaml", str(root / "without"), *STEPS, "logging.eval_every=0",
                                nproc=1)))
    return (str(root / "with"), with_valid), (str(root / "without"), without)


def test_validation_leaves_the_training_losses_unchanged(runs):
    (a, _), (b, _) = runs
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
    for s in ma:  # bit for bit: the validation touches no RNG stream and no training data position
        keys = {k for k in mb[s] if k.startswith(("loss", "aux_"))} | {"grad_norm"}
        assert keys == {k for k in ma[s] if k.startswith(("loss", "aux_"))} | {"grad_norm"}
        for key in keys:
            assert ma[s][key] == mb[s][key], (s, key, ma[s][key], mb[s][key])
    assert not any(k.startswith("valid") for r in mb.values() for k in r)


def test_validation_rows_tensorboard_and_checkpoint_meta(runs):
    (a, _), _ = runs
    m = metrics(a)
    assert [s for s, r in m.items() if "valid_loss" in r] == [2, 4]
    for s in (2, 4):
        r = m[s]
        assert r["valid_loss_speech"] > 0 and r["valid_loss_music"] > 0  # the balanced validation mix
        assert len(r["valid_codebooks"]["speech"]) == 8
        assert abs(sum(r["valid_codebooks"]["all"]) - r["valid_loss"]) < 1e-9  # summed over codebooks
        assert abs(r["valid_loss_per_codebook"] * 8 - r["valid_loss"]) < 1e-9
    meta = json.load(open(os.path.join(a, "checkpoints", "step_00000004", "meta.json")))
    assert meta["valid"]["last"] == {"step": 4, "loss": m[4]["valid_loss"],
                                     "loss_per_task": {"music": m[4]["valid_loss_music"],
                                                       "speech": m[4]["valid_loss_speech"]}}
    best = min((2, 4), key=lambda s: m[s]["valid_loss"])
    assert meta["valid"]["best"]["step"] == best and meta["valid"]["best"]["loss"] == m[best]["valid_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(os.path.join(a, "tb"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert {"valid/loss", "valid/loss_speech", "valid/loss_music", "valid/codebook_speech/7"} <= set(tags)
    assert [e.step for e in ev.Scalars("valid/loss")] == [2, 4]


def test_stdout_has_one_line_per_log_every(runs):
    (a, p), (_, p0) = runs
    lines = [line for line in p.stdout.splitlines() if re.search(r"\bstep \d+/4 \|", line)]
    assert len(lines) == 2 and "step 2/4 |" in lines[0] and "step 4/4 |" in lines[1]  # log_every 2
    m = metrics(a)
    for line, s in zip(lines, (2, 4)):
        per_cb = m[s]["loss"] / 8
        assert f"loss {m[s]['loss']:.4f} (per token, sum over 8 codebooks; {per_cb:.4f} per codebook)" in line
        assert f"lr {m[s]['lr']:.3g}" in line and " tokens/s" in line and "grad norm" in line
        assert "peak mem" in line and "skipped 0" in line and "ETA" in line and "speech" in line
    assert sum("validation at step" in line for line in p.stdout.splitlines()) == 2
    assert len([line for line in p0.stdout.splitlines() if re.search(r"\bstep \d+/4 \|", line)]) == 4
