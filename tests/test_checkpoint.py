"""Checkpoint bookkeeping without processes: which tags are visible, the COMPLETE manifest and its check,
retention, the client state's loader (weights_only), the streaming safetensors writer, metrics truncation,
the launcher environment (torchrun / SLURM)."""

import json
import os
import random

import numpy as np
import pytest
import torch

from tests.crafted import RunsCode
from training.checkpoint.client import load_client, rng_state, save_client, set_rng_state
from training.checkpoint.manifest import (
    COMPLETE,
    CheckpointError,
    complete_tags,
    find_checkpoint,
    tag_name,
    verify,
    write_complete,
)
from training.checkpoint.retention import prune
from training.checkpoint.safetensors_io import SafetensorsReader, write_safetensors
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


def test_prune_keeps_last_n_milestones_and_the_newest_incomplete(tmp_path):
    ckpt = str(tmp_path)
    for s in (10, 20, 30, 40, 50):
        _tag(ckpt, s)
    _tag(ckpt, 5, complete=False)  # older leftover: removed
    _tag(ckpt, 90, complete=False)  # newer than every complete one (maybe being written): kept
    prune(ckpt, keep_last=2, keep_every=20)
    assert sorted(os.listdir(ckpt)) == [tag_name(s) for s in (20, 40, 50, 90)]
    prune(ckpt, keep_last=1)
    assert sorted(os.listdir(ckpt)) == [tag_name(s) for s in (50, 90)]


def test_manifest_lists_files_and_verify_names_missing_and_truncated_ones(tmp_path):
    tag = str(tmp_path / tag_name(7))
    os.makedirs(os.path.join(tag, "client"))
    for name, size in (("a.pt", 100), ("b.pt", 50), ("client/rank00000.pt", 10)):
        open(os.path.join(tag, name), "wb").write(b"x" * size)
    files = write_complete(tag, 7)
    assert files == {"a.pt": 100, "b.pt": 50, "client/rank00000.pt": 10}
    assert json.load(open(os.path.join(tag, COMPLETE))) == {"step": 7, "files": files}
    verify(tag)
    os.remove(os.path.join(tag, "client", "rank00000.pt"))
    open(os.path.join(tag, "a.pt"), "r+b").truncate(60)
    with pytest.raises(CheckpointError) as e:
        verify(tag)
    message = str(e.value)
    assert "missing: client/rank00000.pt" in message and "a.pt (60 bytes, 100 when saved)" in message
    assert "b.pt" not in message


def test_client_state_round_trip_with_weights_only(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {"step": 9, "data": {"position": 36}, "rng": rng_state()}
    path = save_client(str(tmp_path), 1, state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = load_client(path)
    assert loaded["step"] == 9 and loaded["data"] == {"position": 36}
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_crafted_client_file_is_refused_and_its_code_does_not_run(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "rank00000.pt")
    torch.save({"step": 1, "rng": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_client(path)
    assert path in str(e.value) and "refusing to load" in str(e.value) and "exec" in str(e.value)
    assert not os.path.exists(marker)


def test_streaming_safetensors_writer_and_the_range_reader(tmp_path):
    from safetensors.torch import load_file
    tensors = {"w": torch.randn(5, 7), "b": torch.randn(3).bfloat16(), "i": torch.arange(6).reshape(2, 3)}
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], tensors.__getitem__)
    loaded = load_file(path)  # the safetensors package reads what we wrote
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = SafetensorsReader(path)
    assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
    for start, numel in ((0, 35), (3, 10), (7, 7), (34, 1)):
        got = reader.read("w", start, numel)
        assert torch.equal(got, tensors["w"].reshape(-1)[start:start + numel])
    into = torch.zeros(10)
    reader.read("w", 3, 4, out=into[2:6])  # straight into a slice of a larger buffer
    assert torch.equal(into[2:6], tensors["w"].reshape(-1)[3:7]) and into[:2].eq(0).all()
    with pytest.raises(ValueError):  # a tensor that does not match its header: no file is left behind
        write_safetensors(str(tmp_path / "y.safetensors"), [("w", (2, 2), torch.float32)],
                          lambda name: torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


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
