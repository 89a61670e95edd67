"""`--nproc N` leaves the accelerator to each rank (GPU when there is one): the launcher no longer forces
DeepSpeed onto its CPU accelerator. The GPU run itself is a gpu-marked test."""

import os
import subprocess
import sys

import pytest

from training.cluster import launch


class _Exited:
    def __init__(self, cmd, env):
        self.env = env

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


def _child_envs(monkeypatch, **env):
    started = []

    def popen(cmd, env):
        started.append(_Exited(cmd, env))
        return started[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch.launch_local(["train"], 2) == 0
    return [p.env for p in started]


def test_nproc_does_not_force_the_cpu_accelerator(monkeypatch):
    envs = _child_envs(monkeypatch)
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert all("DS_ACCELERATOR" not in e for e in envs)  # each rank picks cuda when it sees a GPU
    assert all(e["DS_ACCELERATOR"] == "cpu" for e in _child_envs(monkeypatch, DS_ACCELERATOR="cpu"))


@pytest.mark.gpu
def test_nproc_trains_on_the_gpu(tmp_path):
    """On fixture data (synthetic shards and tokenizer, data_prep.fixtures): the demo corpus would spend a
    minute on the CPU (and need espeak-ng) before the GPU does anything."""
    from data_prep.fixtures import write_synthetic_mix

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mix = write_synthetic_mix(str(tmp_path / "data"))
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    p = subprocess.run([sys.executable, "-m", "training.cli", "train", "--config", "tiny/stage1_speech.yaml",
                        "--out", str(tmp_path / "run"), "--nproc", "1", "--max-steps", "1",
                        f"data.train={mix}"],
                       cwd=root, env={**env, "PYTHONPATH": root}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world 1 on cuda:0" in p.stdout
