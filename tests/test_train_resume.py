"""End-to-end resume tests: `unimoe train --nproc 2` (2 gloo ranks, real DeepSpeed, ZeRO 2, EP 2, the tiny
MoE on the demo corpus) killed, preempted, failing to write, out of disk space and resharded, compared with
one uninterrupted run. Faults come from outside the trainer (tests/faults/sitecustomize.py)."""

import json
import os
import signal
import time

import pytest
import torch

from tests.train_runs import (
    assert_same_losses,
    fault_env,
    kill_group,
    metrics,
    run,
    start,
    train_cmd,
    wait_for_step,
)
from training.checkpoint.manifest import COMPLETE, complete_tags
from training.checkpoint.weights import full_state_dict, load_for_inference
from training.cli import main
from training.cluster.launch import FAIL_GRACE_S

pytestmark = pytest.mark.timeout(900)
STEPS = 6  # tiny/joint.yaml: max_steps 6, checkpoint every 3


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def _latest(run_dir):
    return open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("baseline") / "run")
    _ok(run(train_cmd("joint.yaml", out)))
    m = metrics(out)
    assert sorted(m) == list(range(1, STEPS + 1)) and all(r["skipped"] == 0 for r in m.values())
    return out, m


def test_sigterm_saves_exits_75_and_continues(baseline, tmp_path):
    _, ref = baseline
    out = str(tmp_path / "run")
    proc = start(train_cmd("joint.yaml", out), log=str(tmp_path / "log1"))
    wait_for_step(proc, out, 1)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it to both ranks
    assert proc.wait(timeout=120) == 75
    stopped = max(metrics(out))
    assert stopped < STEPS
    tags = complete_tags(os.path.join(out, "checkpoints"))
    assert tags and tags[-1].endswith(f"step_{stopped:08d}")
    _ok(run(train_cmd("joint.yaml", out, "--resume", "auto")))
    got = metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_losses(ref, got, range(1, STEPS + 1))


def test_kill_during_save_then_kill_9_then_resume_gives_the_same_losses(baseline, tmp_path):
    _, ref = baseline
    out = str(tmp_path / "run")
    ckpt_dir = os.path.join(out, "checkpoints")
    # 1. rank 0 SIGKILLs itself after DeepSpeed wrote step 6 and before the checkpoint was complete
    p = run(train_cmd("joint.yaml", out), env={"UNIMOE_FAULT_KILL_IN_SAVE": "6"})
    assert p.returncode != 0
    assert os.path.isdir(os.path.join(ckpt_dir, "step_00000006"))
    assert not os.path.exists(os.path.join(ckpt_dir, "step_00000006", COMPLETE))
    assert _latest(out) == "step_00000003"
    # 2. --resume auto takes step 3; kill -9 (every rank) after step 4
    proc = start(train_cmd("joint.yaml", out, "--resume", "auto"), log=str(tmp_path / "log2"))
    wait_for_step(proc, out, 4)
    kill_group(proc)
    assert [os.path.basename(t) for t in complete_tags(ckpt_dir)] == ["step_00000003"]
    # 3. --resume auto again: steps 4..6 equal the uninterrupted run's
    p = run(train_cmd("joint.yaml", out, "--resume", "auto"))
    _ok(p)
    assert "at step 3 (DeepSpeed files)" in p.stdout
    got = metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_losses(ref, got, range(4, STEPS + 1))
    assert os.path.exists(os.path.join(ckpt_dir, "step_00000006", COMPLETE))


def test_a_rank_failing_to_write_deepspeed_files_leaves_no_complete_and_resume_matches(baseline, tmp_path):
    """Rank 1's disk fails while DeepSpeed writes its ZeRO partition of step 6: no COMPLETE for step 6,
    `latest` still names step 3, rank 0 does not wait for long, and --resume auto redoes steps 4..6."""
    _, ref = baseline
    out = str(tmp_path / "run")
    t0 = time.time()
    p = run(train_cmd("joint.yaml", out),
            env=fault_env(UNIMOE_TEST_FAIL_WRITE="1:step_00000006/zero_pp_rank_1_"))
    elapsed = time.time() - t0
    assert p.returncode != 0
    assert "No space left on device (injected" in p.stdout + p.stderr
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_00000006", COMPLETE))
    assert _latest(out) == "step_00000003"
    assert [os.path.basename(t) for t in complete_tags(os.path.join(out, "checkpoints"))] == ["step_00000003"]
    assert elapsed < FAIL_GRACE_S + 150, elapsed  # the whole run incl. start-up; no 30-minute collective wait
    p = run(train_cmd("joint.yaml", out, "--resume", "auto"))
    _ok(p)
    assert "at step 3 (DeepSpeed files)" in p.stdout
    assert_same_losses(ref, metrics(out), range(4, STEPS + 1))
    assert _latest(out) == "step_00000006"


def test_a_rank_failing_to_write_its_client_file_leaves_no_complete(tmp_path):
    """The failure comes after DeepSpeed's part: the ranks agree through the flag all-reduce, all stop."""
    out = str(tmp_path / "run")
    p = run(train_cmd("joint.yaml", out, "--max-steps", "3"),
            env=fault_env(UNIMOE_TEST_FAIL_WRITE="1:step_00000003/client/rank00001"))
    assert p.returncode != 0
    assert "a rank could not write its files" in p.stdout + p.stderr
    assert complete_tags(os.path.join(out, "checkpoints")) == []
    assert not os.path.exists(os.path.join(out, "checkpoints", "latest"))


def test_no_room_refuses_the_saves_keeps_training_and_exits_75(tmp_path):
    out = str(tmp_path / "run")
    p = run(train_cmd("joint.yaml", out, "--max-steps", "4"), env=fault_env(UNIMOE_TEST_DISK_FREE="1000"))
    assert p.returncode == 75, p.stdout[-2000:] + p.stderr[-2000:]
    assert "checkpoint step_00000003 refused: 0 MiB free" in p.stderr
    assert "checkpoint of step 4 (final) refused" in p.stdout
    assert sorted(metrics(out)) == [1, 2, 3, 4]  # step 3's refusal did not stop the run
    assert complete_tags(os.path.join(out, "checkpoints")) == []


def test_reshard_ep2_to_ep1_next_steps_match(baseline, tmp_path):
    base, ref = baseline
    out = str(tmp_path / "ep1")
    assert main(["ckpt", "reshard", "--ckpt", os.path.join(base, "checkpoints", "step_00000003"),
                 "--ep", "1", "--out", out]) == 0
    assert main(["ckpt", "reshard", "--ckpt", base, "--ep", "3", "--out", out + "x"]) == 2
    p = run(train_cmd("joint.yaml", out, "--resume", "auto", "--max-steps", "5", "parallel.ep=1"))
    _ok(p)
    assert "resharded state" in p.stdout and "ep 1" in p.stdout
    assert_same_losses(ref, metrics(out), [4, 5], tol=1e-5)  # step 5: AdamW's moments came along


def test_resume_at_another_layout_reshards_on_load(baseline, tmp_path):
    """Saved at TP1/EP2/DP2 (step 3), resumed at TP2/EP1/DP1 on the same 2 processes with the same
    micro-batches: one line says so, and steps 4 and 5 match the run that never changed layout."""
    base, ref = baseline
    out = str(tmp_path / "tp2")
    p = run(train_cmd("joint.yaml", out, "--resume", os.path.join(base, "checkpoints", "step_00000003"),
                      "--max-steps", "5", "parallel.tp=2", "parallel.ep=1", "data.micro_batch_size=2"))
    _ok(p)
    assert p.stdout.count("resharded on load") == 1  # rank 0 only
    assert "at step 3 (resharded on load from tp=1 ep=2 dp=2" in p.stdout and "to tp=2 ep=1 dp=1" in p.stdout
    got = metrics(out)
    assert sorted(got) == [4, 5]
    assert_same_losses(ref, got, [4, 5], tol=1e-5)  # step 5: AdamW's moments came along


def test_export_and_load_for_inference(baseline, tmp_path):
    base, _ = baseline
    out = str(tmp_path / "model.safetensors")
    assert main(["ckpt", "export", "--ckpt", base, "--out", out]) == 0
    assert json.load(open(str(tmp_path / "model.json")))["step"] == STEPS
    model, meta = load_for_inference(out)
    assert meta["step"] == STEPS and meta["codec_info"]["num_codebooks"] == model.cfg.num_codebooks
    sd = model.state_dict()
    assert any(".experts.7." in k for k in sd) and all(v.dtype == torch.float32 for v in sd.values())
    # DeepSpeed's own module files (mp_rank_00 + per-expert files) hold the same weights
    from moe.deepspeed_compat import expert_files_to_state_dict
    tag = complete_tags(os.path.join(base, "checkpoints"))[-1]
    ds = dict(torch.load(os.path.join(tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"])
    ds.update(expert_files_to_state_dict(tag))
    assert set(ds) == set(sd)
    for k, v in ds.items():
        torch.testing.assert_close(v.float(), sd[k], rtol=0, atol=0)
    model2, _ = load_for_inference(base)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    assert full_state_dict(tag)[1]["layout"]["ep"] == 2
    assert main(["ckpt", "export", "--ckpt", base, "--out", str(tmp_path / "model.pt")]) == 2


def test_validation_across_ranks_equals_unimoe_eval_of_the_checkpoint(baseline, tmp_path):
    """tiny/joint.yaml validates at steps 3 and 6 on one batch of 4 (2 per data-parallel rank, experts over
    EP 2); `unimoe eval` of the saved step-6 model on the same 4 samples in one process gives that loss."""
    from data_prep.demo import ensure_demo_data
    from training.eval.evaluate import evaluate
    base, ref = baseline
    assert [s for s, r in ref.items() if "valid_loss" in r] == [3, 6]
    result = evaluate(os.path.join(base, "checkpoints", "step_00000006"), ensure_demo_data()["valid"],
                      out_dir=str(tmp_path), batches=1, batch_size=4, routing=False)
    assert abs(result["loss"] - ref[6]["valid_loss"]) <= 1e-5 * ref[6]["valid_loss"]
    for task, loss in result["loss_per_task"].items():
        assert abs(loss - ref[6][f"valid_loss_{task}"]) <= 1e-5 * loss
    meta = json.load(open(os.path.join(base, "checkpoints", "step_00000006", "meta.json")))
    assert meta["valid"]["last"]["step"] == 6 and meta["valid"]["best"]["step"] in (3, 6)


def test_bad_layout_is_a_config_error_before_any_process_group(tmp_path, capsys):
    assert main(train_cmd("joint.yaml", str(tmp_path / "x"), "parallel.ep=4")[3:]) == 2
    assert "parallel.ep=4 must divide the data-parallel size 2" in capsys.readouterr().err
    assert main(train_cmd("joint.yaml", str(tmp_path / "x"), "parallel.zero_stage=3")[3:]) == 2
    assert "ZeRO stage 3" in capsys.readouterr().err
    assert main(train_cmd("stage2.yaml", str(tmp_path / "x"), f"stage.init_from=[{tmp_path}/none]")[3:]) == 2
    assert "stage.init_from: " in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
