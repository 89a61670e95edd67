"""`unimoe slurm submit`: the curriculum file and the --dry-run command lines (no SLURM needed).

    .venv/bin/pytest tests/test_slurm_submit.py
    UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/test_slurm_submit.py    # after an intended change
"""

import argparse
import os
import re

import pytest
import yaml

from training.cluster.slurm import (
    REPO_ROOT,
    CurriculumError,
    job_env,
    load_curriculum,
    resolve_gpus,
    run_cli,
    sbatch_command,
)

SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots", "slurm_submit_dry_run.txt")
CURRICULUM = os.path.join("training", "configs", "curriculum.yaml")


def _dry_run(capsys, curriculum, runs=None):
    code = run_cli(argparse.Namespace(curriculum=curriculum, dry_run=True, runs=runs))
    captured = capsys.readouterr()
    return code, captured.out.replace(REPO_ROOT, "<ROOT>"), captured.err


def test_dry_run_snapshot_at_the_configs_targets(capsys, monkeypatch):
    monkeypatch.delenv("SCRATCH", raising=False)  # run dirs under runs/ in the checkout
    code, out, _ = _dry_run(capsys, CURRICULUM)
    assert code == 0
    if os.environ.get("UPDATE_SNAPSHOTS"):
        os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
        with open(SNAPSHOT, "w") as f:
            f.write(out)
    with open(SNAPSHOT) as f:
        assert out == f.read(), "dry-run output changed; UPDATE_SNAPSHOTS=1 if intended"
    # what the snapshot documents: each job's shape is its stage config's target (cluster.gpus: 192 for the
    # MoE stages, 48 per specialist), and the afterok chain
    assert out.count("--nodes=24 --ntasks-per-node=8 --gpus-per-node=8") == 2
    assert out.count("--nodes=6 --ntasks-per-node=8 --gpus-per-node=8") == 2
    assert "--dependency=afterok:$STAGE1_SPEECH_JOB:$STAGE1_MUSIC_JOB" in out
    assert "--dependency=afterok:$STAGE2_JOB" in out
    # the name torch reads (NCCL_ASYNC_ERROR_HANDLING is deprecated) and the bounded retry of a failed stage
    assert out.count("TORCH_NCCL_ASYNC_ERROR_HANDLING=1") == 4 and " NCCL_ASYNC" not in out
    assert out.count("UNIMOE_RETRIES=1") == 4


def test_tiny_curriculum_is_cpu_2_tasks(capsys):
    stages = load_curriculum(os.path.join(REPO_ROOT, "training/configs/tiny/curriculum.yaml"), runs="/r")
    assert [s.name for s in stages] == ["stage1_speech", "stage1_music", "stage2", "stage3"]
    assert all((s.nodes, s.tasks_per_node, s.gpus_per_node, s.cpus_per_task) == (1, 2, 0, 1) for s in stages)
    assert stages[2].overrides == ["stage.init_from=[/r/stage1_speech,/r/stage1_music]"]
    cmd = sbatch_command(stages[3], ["41"])
    assert "--gpus-per-node=0" in cmd and "--dependency=afterok:41" in cmd
    assert cmd[-1] == "slurm/stage3.sbatch"
    assert "--output=/r/stage3/slurm-%j.out" in cmd
    code, out, err = _dry_run(capsys, "training/configs/tiny/curriculum.yaml", runs="/r")
    assert code == 0 and "warning" not in err  # the tiny stage configs validate for 2 tasks


def _write(tmp_path, doc):
    path = tmp_path / "cur.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


STAGE = {"name": "a", "template": "slurm/stage1.sbatch", "config": "training/configs/tiny/stage1_speech.yaml",
         "run_dir": "{runs}/a"}


@pytest.mark.parametrize("doc, message", [
    ({"stages": []}, "non-empty `stages:`"),
    ({"stages": [STAGE], "cluster": 1}, "unknown top-level keys ['cluster']"),
    ({"stages": [{**STAGE, "gpu": 8}]}, "unknown keys ['gpu']"),
    ({"stages": [{k: v for k, v in STAGE.items() if k != "config"}]}, "needs ['config']"),
    ({"stages": [{**STAGE, "after": ["b"]}]}, "is after 'b', which is not a stage listed before it"),
    ({"stages": [STAGE, STAGE]}, "two stages are named 'a'"),
    ({"stages": [{**STAGE, "tasks_per_node": 4, "gpus_per_node": 8}]}, "one task per GPU"),
    ({"stages": [{**STAGE, "nodes": 0}]}, "nodes must be an integer >= 1"),
    ({"stages": [{**STAGE, "run_dir": "{base}/a"}]}, "only {runs} may be used"),
])
def test_bad_curriculum_is_named(tmp_path, doc, message):
    with pytest.raises(CurriculumError) as e:
        load_curriculum(_write(tmp_path, doc))
    assert message in str(e.value) and "cur.yaml" in str(e.value)


def test_submit_refuses_a_layout_the_stage_config_cannot_run(tmp_path, capsys):
    # tiny stage 2 has parallel.ep=2: it cannot run on 1 task; --dry-run warns, submit refuses
    doc = {"stages": [{**STAGE, "name": "s2", "config": "training/configs/tiny/stage2.yaml",
                       "tasks_per_node": 1, "overrides": ["stage.init_from=[x,y]"]}]}
    path = _write(tmp_path, doc)
    code, _, err = _dry_run(capsys, path)
    assert code == 0 and re.search(r"warning: stage 's2' \(1 node\(s\) x 1 tasks\).*parallel.ep=2", err)
    assert run_cli(argparse.Namespace(curriculum=path, dry_run=False, runs=None)) == 2
    assert "parallel.ep=2" in capsys.readouterr().err


def test_runs_root_from_flag_file_or_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    assert load_curriculum(CURRICULUM)[3].run_dir == "/scratch/me/unimoe/runs/stage3"  # off the checkout
    assert load_curriculum(CURRICULUM, runs="/r")[3].run_dir == "/r/stage3"
    monkeypatch.delenv("SCRATCH")
    assert load_curriculum(CURRICULUM)[3].run_dir == "runs/stage3"
    monkeypatch.setenv("PROJ", "/proj/x")
    path = _write(tmp_path, {"runs": "$PROJ/runs", "stages": [STAGE]})
    assert load_curriculum(path)[0].run_dir == "/proj/x/runs/a"
    monkeypatch.delenv("PROJ")
    with pytest.raises(CurriculumError, match=r"uses \$PROJ, which is not set"):
        load_curriculum(path)


def test_stage_without_gpus_on_a_gpu_cluster_is_an_error(tmp_path):
    cpu = {**STAGE, "name": "b", "gpus_per_node": 0}
    stages = load_curriculum(_write(tmp_path, {"stages": [STAGE, cpu]}))
    assert stages[0].gpus_per_node is None and stages[1].gpus_per_node == 0
    with pytest.raises(CurriculumError, match="'a': gpus_per_node is not set and partition .* has GPUs"):
        resolve_gpus(stages, gpus_of=lambda partition: "gpu:h100:8")
    assert resolve_gpus(stages, gpus_of=lambda partition: "") == [] and stages[0].gpus_per_node == 0
    stages = load_curriculum(_write(tmp_path, {"stages": [STAGE]}))
    warnings = resolve_gpus(stages, gpus_of=lambda partition: None)  # no sinfo: say so, submit as CPU
    assert "sinfo cannot tell" in warnings[0] and "--gpus-per-node=0" in sbatch_command(stages[0], [])


def test_retries_is_a_bounded_stage_key_exported_to_the_job(tmp_path):
    doc = {"defaults": {"retries": 2}, "stages": [STAGE, {**STAGE, "name": "b", "retries": 0}]}
    stages = load_curriculum(_write(tmp_path, doc))
    assert [job_env(s, "/root")["UNIMOE_RETRIES"] for s in stages] == ["2", "0"]
    assert load_curriculum(_write(tmp_path, {"stages": [STAGE]}))[0].retries == 1
    with pytest.raises(CurriculumError, match="retries must be an integer >= 0"):
        load_curriculum(_write(tmp_path, {"stages": [{**STAGE, "retries": -1}]}))



STAGE_CONFIGS = {"stage1.sbatch": ["stage1_speech.yaml", "stage1_music.yaml"],
                 "stage2.sbatch": ["stage2.yaml"], "stage3.sbatch": ["stage3.yaml"]}


def _target(config, overrides=()):
    from training.config import load_config
    return load_config(os.path.join(REPO_ROOT, config), list(overrides)).cluster


def test_job_shape_is_the_stage_configs_target_stated_once():
    """curriculum.yaml states no job size: each stage's comes from its config's `cluster` section."""
    with open(os.path.join(REPO_ROOT, CURRICULUM)) as f:
        doc = yaml.safe_load(f)
    shape_keys = {"nodes", "tasks_per_node", "gpus_per_node"}
    assert not shape_keys & set(doc["defaults"]) and not any(shape_keys & set(s) for s in doc["stages"])
    for stage in load_curriculum(os.path.join(REPO_ROOT, CURRICULUM), runs="/r"):
        target = _target(stage.config, stage.overrides)
        assert target.gpus and stage.world_size == target.gpus, stage.name
        assert stage.gpus_per_node == stage.tasks_per_node == target.gpus_per_node
        assert stage.nodes == target.gpus // target.gpus_per_node


def test_a_job_size_that_contradicts_the_config_is_refused_and_overrides_retarget(tmp_path):
    stage3 = {**STAGE, "name": "s3", "config": "training/configs/stage3.yaml",
              "overrides": ["stage.init_from=x"]}
    clash = r"'s3' states nodes: 4, but its config training/configs/stage3.yaml targets cluster.gpus: 192 "
    with pytest.raises(CurriculumError, match=clash + r"\(24 node\(s\) x 8 GPUs\)"):
        load_curriculum(_write(tmp_path, {"stages": [{**stage3, "nodes": 4}]}))
    doc = {"defaults": {"gpus_per_node": 8}, "stages": [{**stage3, "nodes": 24}]}
    agree = load_curriculum(_write(tmp_path, doc))
    assert agree[0].world_size == 192
    moved = {**stage3, "overrides": ["stage.init_from=x", "cluster.gpus=64"]}
    assert load_curriculum(_write(tmp_path, {"stages": [moved]}))[0].nodes == 8


@pytest.mark.parametrize("template", sorted(STAGE_CONFIGS))
def test_sbatch_templates_ask_for_their_configs_target(template):
    with open(os.path.join(REPO_ROOT, "slurm", template)) as f:
        sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", f.read(), re.M))
    for config in STAGE_CONFIGS[template]:
        target = _target(os.path.join("training", "configs", config))
        assert int(sbatch["nodes"]) * int(sbatch["ntasks-per-node"]) == target.gpus, (template, config)
        assert int(sbatch["gpus-per-node"]) == int(sbatch["ntasks-per-node"]) == target.gpus_per_node


def test_submit_refuses_a_stage_whose_layout_does_not_fit_its_target(tmp_path, capsys):
    doc = {"stages": [{**STAGE, "name": "s3", "config": "training/configs/stage3.yaml",
                       "overrides": ["stage.init_from=x", "model.recompute=none"]}]}
    path = _write(tmp_path, doc)
    code, _, err = _dry_run(capsys, path)
    assert code == 0 and re.search(r"warning: stage 's3' \(24 node\(s\) x 8 tasks\): its layout tp=1 ep=1 "
                                   r"needs [\d.]+ GiB per GPU on its target \(192 x H100-80G, 80.0 GiB", err)
    assert run_cli(argparse.Namespace(curriculum=path, dry_run=False, runs=None)) == 2
    assert "unimoe plan --config training/configs/stage3.yaml" in capsys.readouterr().err


def test_a_job_of_another_size_than_its_configs_target_logs_one_warning():
    """slurm/launch.sh runs `python -m training.cluster.slurm CONFIG NTASKS OVERRIDES` before training."""
    import subprocess
    import sys

    from training.cluster.slurm import job_size_note

    stage3 = "training/configs/stage3.yaml"
    assert job_size_note(stage3, [], 192) is None and job_size_note(stage3, ["cluster.gpus=32"], 32) is None
    assert job_size_note("training/configs/tiny/stage3.yaml", [], 2) is None  # no target stated
    with open(os.path.join(REPO_ROOT, "slurm", "launch.sh")) as f:
        assert 'python -m training.cluster.slurm "$CONFIG" "${SLURM_NTASKS:-1}" "${overrides[@]}"' in f.read()
    p = subprocess.run([sys.executable, "-m", "training.cluster.slurm", stage3, "32", "optim.lr=2e-5"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.strip() == (
        f"warning: {stage3} is sized for cluster.gpus=192 x H100-80G, this job has 32 task(s): its layout "
        f"was planned for 192 (check: unimoe plan --config {stage3} --gpus 32)")
