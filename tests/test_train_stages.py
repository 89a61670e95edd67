"""The three-stage curriculum back to back on the demo corpus (tiny configs, 2 gloo ranks, real DeepSpeed),
each stage starting from the previous stage's checkpoint; and the non-finite guard."""

import math
import os

import pytest
import torch

from tests.train_runs import metrics, run, train_cmd
from training.checkpoint.manifest import complete_tags, read_meta
from training.checkpoint.weights import full_state_dict

pytestmark = pytest.mark.timeout(900)
STEPS = "max_steps=2"


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_curriculum_stage1_stage2_stage3(tmp_path):
    runs = {n: str(tmp_path / n) for n in ("speech", "music", "stage2", "stage3")}
    _ok(run(train_cmd("stage1_speech.yaml", runs["speech"], STEPS)))
    _ok(run(train_cmd("stage1_music.yaml", runs["music"], STEPS)))
    p = _ok(run(train_cmd("stage2.yaml", runs["stage2"], STEPS,
                          f"stage.init_from=[{runs['speech']}, {runs['music']}]")))
    assert "upcycled 2 specialists" in p.stdout
    p = _ok(run(train_cmd("stage3.yaml", runs["stage3"], STEPS, f"stage.init_from=[{runs['stage2']}]")))
    assert "stage 3: weights from" in p.stdout

    for name in runs:
        m = metrics(runs[name])
        assert sorted(m) == [1, 2] and all(r["skipped"] == 0 for r in m.values())
    assert set(metrics(runs["speech"])[1]) >= {"loss", "loss_speech", "lr", "grad_norm", "tokens_per_s"}
    assert "loss_music" in metrics(runs["stage3"])[1] and "aux_balance_loss" in metrics(runs["stage3"])[1]
    assert os.listdir(os.path.join(runs["stage3"], "tb"))

    specialist, _ = full_state_dict(runs["speech"])
    s2, meta2 = full_state_dict(runs["stage2"])
    s3_start = read_meta(complete_tags(os.path.join(runs["stage3"], "checkpoints"))[-1])
    assert meta2["stage"] == 2 and s3_start["stage"] == 3
    # stage 2 froze the routed experts: expert 0 of layer 0 is still slice 0 of the speech specialist's FFN
    w = s2["layers.0.ffn.experts.0.up_proj.weight"]
    torch.testing.assert_close(w, specialist["layers.0.ffn.up_proj.weight"][: w.shape[0]], rtol=0, atol=0)
    # ... and stage 3 trains them
    s3, _ = full_state_dict(runs["stage3"])
    assert not torch.equal(s3["layers.0.ffn.experts.0.up_proj.weight"], w)
    assert not torch.equal(s3["layers.0.ffn.gate.weight"], s2["layers.0.ffn.gate.weight"])


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    """bf16 on 2 ranks, a checkpoint every 2 steps: NaN steps 2, 5, 6 are skipped and counted; step 2's
    periodic checkpoint is not written, and the guard stops the run at step 6 (also the last step) without
    one, so `latest` stays on step 4, the last finite one. MFU is per GPU (world size 2)."""
    from training.checkpoint.reader import model_config_from_meta
    from training.model.params import parameter_counts, train_flops_per_token
    out = str(tmp_path / "run")
    p = run(train_cmd("stage1_speech.yaml", out, "--save-every", "2", "optim.max_nonfinite_in_row=2",
                      "parallel.precision=bf16", "parallel.ds_config=ds_configs/zero2_bf16.json",
                      "logging.peak_flops=1e12"),
            env={"UNIMOE_FAULT_NONFINITE": "2,5,6"})
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "2 non-finite steps in a row" in p.stdout and "step 2 is non-finite: no checkpoint" in p.stdout
    m = metrics(out)
    assert [m[s]["skipped"] for s in sorted(m)] == [0, 1, 1, 1, 2, 3]
    assert [m[s]["grad_norm"] is None for s in sorted(m)] == [False, True, False, False, True, True]
    tags = complete_tags(os.path.join(out, "checkpoints"))
    assert [os.path.basename(t) for t in tags] == ["step_00000004"]
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000004"
    sd, meta = full_state_dict(out)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    cfg = model_config_from_meta(meta)
    c = parameter_counts(cfg)
    for r in m.values():
        # mfu = tokens_per_s (whole job) / 2 GPUs * flops_per_token(seq) / peak, flops_per_token linear in the
        # step's (unlogged) padded length: solving for it must give a whole number of positions
        flops = r["mfu"] * 1e12 * 2 / r["tokens_per_s"]
        seq = (flops - 6 * (c["active_mean"] - c["embedding"])) / (12 * cfg.num_layers * cfg.hidden_size)
        assert 2 <= round(seq) <= cfg.max_seq_len and abs(seq - round(seq)) < 1e-3, (r, seq)
        assert math.isclose(flops, train_flops_per_token(cfg, round(seq)), rel_tol=1e-6)


def test_dense_zero3_resume_and_export_match_deepspeed(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    out = str(tmp_path / "run")
    _ok(run(train_cmd("stage1_speech.yaml", out, "--max-steps", "2", "parallel.zero_stage=3")))
    p = _ok(run(train_cmd("stage1_speech.yaml", out, "--max-steps", "3", "--resume", "auto",
                          "parallel.zero_stage=3")))
    assert "at step 2 (DeepSpeed files)" in p.stdout and sorted(metrics(out)) == [1, 2, 3]
    sd, _ = full_state_dict(out)
    ref = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "checkpoints"), tag="step_00000003")
    assert set(sd) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v.float(), rtol=0, atol=0)
