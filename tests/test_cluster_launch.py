"""Launch details a real cluster trips on: the GPU a task uses, rendezvous ports, NCCL error handling, and
restoring RNG states on a node with another GPU count.

    .venv/bin/pytest tests/test_cluster_launch.py            # CPU
    .venv/bin/pytest tests/test_cluster_launch.py -m gpu     # the CUDA paths, on a GPU machine
"""

import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from training.checkpoint.client import rng_state, set_rng_state
from training.cluster.parallel import cuda_device_index, dist_env, nccl_error_handling_env
from training.cluster.ports import PORT_RANGE, ephemeral_range, job_port, rendezvous_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_index_comes_from_what_the_task_sees():
    assert cuda_device_index(3, 8) == 3  # one task per GPU, every GPU visible
    assert cuda_device_index(3, 1) == 0  # --gpus-per-task=1 / --gpu-bind: the task sees one GPU, device 0
    assert cuda_device_index(5, 4) == 1  # LOCAL_RANK mod visible devices
    with pytest.raises(ValueError):
        cuda_device_index(0, 0)


def test_rendezvous_ports_stay_below_the_ephemeral_range(monkeypatch):
    lo, hi = PORT_RANGE
    assert hi <= 32768  # Linux's default ephemeral ports are 32768-60999
    ports = {job_port(j) for j in range(0, 100_000, 7)}
    assert min(ports) >= lo and max(ports) < hi
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("MASTER_ADDR", "n1")
    for job in ("13000", "19999", "45678"):  # 20000 + job mod 20000 gave 33000, 39999, 25678
        monkeypatch.setenv("SLURM_JOB_ID", job)
        port = dist_env().master_port
        assert lo <= port < hi and not ephemeral_range()[0] <= port <= ephemeral_range()[1]


def test_rendezvous_port_moves_past_a_port_in_use():
    job = 4242
    want = job_port(job)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        try:
            held.bind(("", want))
        except OSError:
            pytest.fail(f"port {want} is taken on this host already")
        held.listen()
        got = rendezvous_port(job)
    assert got != want and PORT_RANGE[0] <= got < PORT_RANGE[1]
    assert rendezvous_port(job, is_free=lambda p: p >= PORT_RANGE[1] - 1) == PORT_RANGE[1] - 1  # wraps around
    with pytest.raises(RuntimeError, match="no free rendezvous port"):
        rendezvous_port(job, is_free=lambda p: False)
    out = subprocess.run([sys.executable, "-m", "training.cluster.ports", str(job)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and int(out.stdout) == rendezvous_port(job)


def test_nccl_async_error_handling_uses_torchs_current_name(monkeypatch):
    # setenv first, so monkeypatch records the variable and removes what the code sets (a plain delenv of
    # an absent variable records nothing, and the value set below would leak into later tests' jobs)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "unset-me")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "3")
    nccl_error_handling_env()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert "NCCL_ASYNC_ERROR_HANDLING" not in os.environ
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    nccl_error_handling_env()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    with open(os.path.join(ROOT, "training", "configs", "curriculum.yaml")) as f:
        text = f.read()
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in text and " NCCL_ASYNC_ERROR_HANDLING" not in text


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path; the CUDA paths are the gpu tests")
def test_rng_restore_warns_when_saved_cuda_states_cannot_be_restored():
    """A checkpoint written on an 8-GPU node (every device's CUDA state, the old format) resumed where no GPU
    is visible: the CPU generators are restored exactly and a warning says the CUDA ones are not."""
    state = rng_state()
    assert state["cuda"] is None
    expected = _draws()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]
    with pytest.warns(RuntimeWarning, match="CUDA RNG state of 8 GPU"):
        set_rng_state(state)
    assert _draws() == expected
    state["cuda"] = None
    set_rng_state(state)  # nothing to warn about
    assert _draws() == expected


@pytest.mark.gpu
def test_rng_state_is_per_rank_and_restores_on_another_gpu_count():
    state = rng_state()
    assert set(state["cuda"]) == {"device", "count", "state"}
    expected = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    # the old format from a node with more GPUs than this one: no error, a warning, device 0's state
    old = {**state, "cuda": [state["cuda"]["state"]] * (torch.cuda.device_count() + 7)}
    with pytest.warns(RuntimeWarning, match="not exact"):
        set_rng_state(old)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


@pytest.mark.gpu
def test_init_parallel_under_per_task_gpu_binding(tmp_path):
    """Local rank 3 of a task that sees one GPU (CUDA_VISIBLE_DEVICES of one device): device 0."""
    code = ("from training.cluster.parallel import init_parallel, shutdown\n"
            "from training.config import ParallelConfig\nimport torch\n"
            "import os\ninit_parallel(ParallelConfig())\n"
            "print(torch.cuda.current_device(), os.environ['LOCAL_RANK'])\nshutdown()\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "0", "DS_ACCELERATOR": "cuda",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(rendezvous_port(os.getpid()))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 0"  # DeepSpeed's engine reads LOCAL_RANK for its device
