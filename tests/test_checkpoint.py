"""Checkpoint bookkeeping without processes: which tags are visible, pruning, metrics truncation, the
launcher environment (torchrun / SLURM)."""

import json
import os

from training.checkpoint.save import COMPLETE, complete_tags, find_checkpoint, prune, tag_name
from training.cluster.parallel import dist_env
from training.metrics import truncate_jsonl


def _tag(ckpt_dir, step, complete=True):
    d = os.path.join(ckpt_dir, tag_name(step))
    os.makedirs(d)
    if complete:
        open(os.path.join(d, COMPLETE), "w").write(f"{step}\n")
    return d


def test_only_complete_tags_are_visible_newest_last(tmp_path):
    ckpt = str(tmp_path / "run" / "checkpoints")
    _tag(ckpt, 10)
    _tag(ckpt, 30)
    _tag(ckpt, 40, complete=False)  # a save that was killed
    _tag(ckpt, 20)
    assert [os.path.basename(t) for t in complete_tags(ckpt)] == [tag_name(s) for s in (10, 20, 30)]
    assert find_checkpoint(str(tmp_path / "run")).endswith(tag_name(30))
    assert find_checkpoint(ckpt).endswith(tag_name(30))
    assert find_checkpoint(os.path.join(ckpt, tag_name(20))).endswith(tag_name(20))
    assert find_checkpoint(str(tmp_path / "nothing")) is None


def test_prune_keeps_last_n_and_the_newest_incomplete(tmp_path):
    ckpt = str(tmp_path)
    for s in (1, 2, 3):
        _tag(ckpt, s)
    _tag(ckpt, 0, complete=False)  # older leftover: removed
    _tag(ckpt, 9, complete=False)  # newer than every complete one (maybe being written): kept
    prune(ckpt, keep_last=2)
    assert sorted(os.listdir(ckpt)) == [tag_name(s) for s in (2, 3, 9)]


def test_truncate_jsonl_drops_redone_steps_and_cut_lines(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": float(s)}) + "\n")
        f.write('{"step": 6, "lo')  # cut by kill -9
    truncate_jsonl(path, 3)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]


def test_dist_env_from_torchrun_slurm_or_nothing(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(k, raising=False)
    e = dist_env()
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("MASTER_ADDR", "node07")
    e = dist_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 8, 1, "node07", "slurm")
    assert e.master_port == 15000 + 1234  # training.cluster.ports.PORT_RANGE
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "29555")
    e = dist_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_port, e.launcher) == (3, 4, 3, 29555, "torchrun")
