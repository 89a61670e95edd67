"""`unimoe demo --minutes 3 --seed 1` end to end (the longest test of the suite, ~4 min on 2 cores), and the
budget planning it relies on.

    .venv/bin/pytest tests/test_demo.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import soundfile as sf

from training.demo.budget import MIN_STEPS, Estimates, StageRun, make_stages, plan_steps, remeasure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _predicted_wall(stages, est):
    spec = est.overhead[1] + stages["speech"].steps * est.dense_step  # side by side
    moe = sum(est.overhead[2] + stages[k].steps * est.moe_step for k in ("stage2", "stage3", "joint"))
    return spec + moe


def _samples(stages, keys):
    return sum(stages[k].steps * stages[k].batch for k in keys)


def test_plan_fits_the_budget_and_gives_the_joint_baseline_the_curriculum_samples():
    stages = make_stages()
    est = Estimates()
    for minutes in (3, 12, 30):
        plan_steps(minutes * 60, est, stages)
        assert _predicted_wall(stages, est) <= minutes * 60 + est.moe_step * 2
        curriculum = _samples(stages, ("speech", "music", "stage2", "stage3"))
        assert abs(_samples(stages, ("joint",)) - curriculum) <= stages["joint"].batch
        assert stages["stage3"].steps >= stages["stage2"].steps >= MIN_STEPS
    # after stage 1 ran slower than predicted, the rest is re-planned into what is left
    plan_steps(180, est, stages)
    spec = stages["speech"]
    spec.wall_s, spec.step_s = 100.0, 2 * est.dense_step
    spec.overhead_s = spec.wall_s - spec.steps * spec.step_s
    remeasure(est, spec)
    plan_steps(80, est, stages, done=("speech", "music"))
    assert stages["speech"].steps == spec.steps  # done stages keep their steps
    assert _samples(stages, ("joint",)) >= _samples(stages, ("speech", "music", "stage2", "stage3")) - 4


def test_tiny_budget_falls_back_to_minimum_steps():
    stages = make_stages()
    plan_steps(1.0, Estimates(), stages)
    assert all(st.steps >= MIN_STEPS for st in stages.values())
    assert isinstance(stages["joint"], StageRun)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    t0 = time.time()
    # --seed 1, not the default 0: the demo works end to end for any seed
    cmd = [sys.executable, "-m", "training.cli", "demo", "--minutes", "3", "--seed", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    print(proc.stdout[-3000:])
    print(f"demo wall time: {wall:.0f} s")

    # progress per stage, then the table (also in results.md)
    for word in ("stage 1", "stage 2", "stage 3", "baseline", "eval", "generate"):
        assert word in proc.stdout, word
    results = (out / "results.md").read_text()
    assert results.strip() in proc.stdout
    rows = [line for line in results.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5
    number = re.compile(r"^\d+\.\d{3}$")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        losses = [c for c in cells[1:3] if c != "—"]
        assert losses and all(number.match(c) for c in losses), row
    codec = json.loads((out / "eval" / "stage3" / "eval.json").read_text())["codec"]
    if codec.get("trained") is False:
        assert "randomly initialised" in proc.stdout

    # where things are: WAVs, routing reports, tensorboard logs
    for name in ("speech.wav", "music.wav"):
        audio, sr = sf.read(out / "samples" / name)
        assert sr == 24000 and len(audio) > 0
    for key in ("stage2", "stage3", "joint"):
        report = json.loads((out / "eval" / key / "routing.json").read_text())
        assert len(report["layers"]) >= 1
        assert (out / "eval" / key / "routing_load.png").stat().st_size > 0
    demo_config = json.loads((out / "demo_config.json").read_text())
    assert demo_config["seed"] == 1
    ran = demo_config["stages"]
    samples = {k: r["steps"] * r["global_batch"] for k, r in ran.items()}
    curriculum = sum(samples[k] for k in ("speech", "music", "stage2", "stage3"))
    assert abs(samples["joint"] - curriculum) <= ran["joint"]["global_batch"]  # the same budget
    for key in ("stage1_speech", "stage1_music", "stage2", "stage3", "joint"):
        tb = out / "runs" / key / "tb"
        assert tb.is_dir() and any(f.startswith("events") for f in os.listdir(tb)), key
        rows = [json.loads(line) for line in (out / "runs" / key / "metrics.jsonl").read_text().splitlines()]
        assert sum("valid_loss" in r for r in rows) >= 2, key  # validation during training, 4 times a stage
