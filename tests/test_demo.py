"""`unimoe demo --minutes 3 --seed 1` end to end (slow: ~6 min on 2 idle cores; run it with -m slow), and
the fixed step plan it runs.

    .venv/bin/pytest tests/test_demo.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import soundfile as sf

from training.demo.budget import IDLE, MIN_STEPS, make_stages, plan_steps, predicted_seconds, steps_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(stages, keys):
    return sum(stages[k].steps * stages[k].batch for k in keys)


def test_plan_fits_the_idle_budget_and_gives_the_joint_baseline_the_curriculum_samples():
    stages = make_stages()
    for minutes in (3, 12, 30):
        plan_steps(minutes * 60, stages)
        assert predicted_seconds(stages) <= minutes * 60 + 2 * IDLE.moe_step
        curriculum = _samples(stages, ("speech", "music", "stage2", "stage3"))
        assert abs(_samples(stages, ("joint",)) - curriculum) <= stages["joint"].batch
        assert stages["stage3"].steps >= stages["stage2"].steps >= MIN_STEPS


def test_step_counts_are_a_fixed_function_of_the_minutes():
    """The table in the README: the same --minutes gives the same steps, more minutes more steps."""
    table = steps_table()
    assert table == steps_table()
    for a, b in zip(table, table[1:]):
        assert b["speech"] >= a["speech"] and b["joint"] >= a["joint"]
        assert b["idle_s"] <= b["minutes"] * 60 + 1


def test_tiny_budget_falls_back_to_minimum_steps():
    stages = make_stages()
    plan_steps(1.0, stages)
    assert all(st.steps >= MIN_STEPS for st in stages.values())


@pytest.mark.slow  # ~3 min of training on an idle 2-core machine + eval, audio scores of 5 models
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
    assert len(rows) == 6 and rows[-1].startswith("| codec ceiling")
    number = re.compile(r"^\d+\.\d{3}$")
    # DNSMOS 2.95, WER 12% (2/8 clips), music 0.62 (floor), or no clip scorable and why: n/a (8 too short)
    note = r"( \((floor|\d+/8 clips|floor, \d+/8 clips)\))?"
    score = re.compile(rf"^(\d+(\.\d+|%){note}|n/a \(\d+ [a-z -]+.*\))$")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        losses = [c for c in cells[1:3] if c != "—"]
        assert row == rows[-1] or (losses and all(number.match(c) for c in losses)), row
        audio = [c for c in cells[3:6] if c != "—"]  # DNSMOS, WER, music score: filled for every model
        assert audio and all(score.match(c) for c in audio), row
    summary = json.loads((out / "results.json").read_text())
    ceiling = summary["codec_ceiling"]
    assert ceiling["speech"]["dnsmos"] is not None and ceiling["music"]["music_score"] is not None
    assert summary["models"]["stage3"]["audio"]["speech"]["clips"] == 8
    codec = json.loads((out / "eval" / "stage3" / "eval.json").read_text())["codec"]
    if codec.get("trained") is False:
        assert "randomly initialised" in proc.stdout

    # where things are: WAVs, routing reports, tensorboard logs
    for name in ("speech.wav", "music.wav", "reference_speech.wav", "reference_music.wav"):
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
    planned = make_stages()
    plan_steps(3 * 60, planned)  # what ran is the fixed plan for --minutes 3, whatever the machine's load
    assert {k: r["steps"] for k, r in ran.items()} == {k: st.steps for k, st in planned.items()}
    for key in ("stage1_speech", "stage1_music", "stage2", "stage3", "joint"):
        tb = out / "runs" / key / "tb"
        assert tb.is_dir() and any(f.startswith("events") for f in os.listdir(tb)), key
        rows = [json.loads(line) for line in (out / "runs" / key / "metrics.jsonl").read_text().splitlines()]
        assert sum("valid_loss" in r for r in rows) >= 2, key  # validation during training, 4 times a stage


def _audio(dnsmos, wer, music, floor=None):
    speech = {"clips": 8, "dnsmos": dnsmos, "wer": wer}
    return {"speech": speech, "music": {"clips": 8, "music_score": music,
                                        **({"music_score_floor": floor} if floor is not None else {})}}


def test_results_table_has_the_audio_columns_the_ceiling_row_and_marks_floors():
    from training.demo.results import results_json, results_table

    stages = make_stages()
    plan_steps(180, stages)
    evals = {k: {"loss_per_task": {"speech": 20.0, "music": 40.0}, "samples": 16,
                 "audio_metrics": {"items_per_task": 8, "seed": 0, "generated": _audio(1.2, 1.0, 0.3)}}
             for k in stages}
    evals["stage3"]["audio_metrics"]["generated"] = _audio(2.6, 0.25, 0.6)
    evals["stage2"]["audio_metrics"]["generated"]["speech"].update(dnsmos_scored=2, wer_scored=8)
    evals["stage3"]["audio_metrics"]["reference"] = _audio(3.0, 0.02, 0.8, floor=0.3)
    evals["music"]["audio_metrics"]["generated"]["music"] = {
        "clips": 8, "music_score": None, "music_score_scored": 0,
        "music_score_null": {"too short (0.4 s < 1.0 s)": 5, "too short (0.2 s < 1.0 s)": 2,
                             "silent (RMS 0)": 1}}
    table = results_table(stages, evals).splitlines()
    lines = [line for line in table if line.startswith("| ") and "---" not in line]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines}
    assert rows[stages["stage3"].title][3:6] == ["2.60", "25%", "0.60"]
    assert rows[stages["joint"].title][3:6] == ["1.20 (floor)", "100% (floor)", "0.30 (floor)"]
    assert rows[stages["stage2"].title][3:5] == ["1.20 (floor, 2/8 clips)", "100% (floor)"]
    assert rows[stages["speech"].title][3:6] == ["1.20 (floor)", "100% (floor)", "—"]  # speech only
    assert rows[stages["music"].title][3:6] == ["—", "—", "n/a (7 too short, 1 silent)"]
    ceiling = next(v for k, v in rows.items() if k.startswith("codec ceiling"))
    assert ceiling[3:6] == ["3.00", "2%", "0.80"]
    summary = results_json(stages, evals)
    assert summary["codec_ceiling"]["speech"]["dnsmos"] == 3.0 and summary["floors"]["music_score"] == 0.3
    assert summary["models"]["joint"]["audio"]["speech"]["wer"] == 1.0
