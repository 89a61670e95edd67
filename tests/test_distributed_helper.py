"""The gloo test helper itself: results come back per rank, failures carry the child's traceback."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t}


def _fail_on_rank_one(rank, world_size):
    dist.barrier()
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_results_per_rank():
    results = run_distributed(_all_reduce_rank, world_size=2)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"].item() == 3.0 for r in results)


def test_child_traceback_surfaces():
    with pytest.raises(AssertionError, match="boom on rank one") as info:
        run_distributed(_fail_on_rank_one, world_size=2, timeout=60)
    assert "rank 1 raised" in str(info.value)


def _fake_one_gpu():
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1

    def no_gpu(*a, **k):
        raise AssertionError("a CUDA call on the CPU test path")

    torch.cuda.set_device = no_gpu


def _harness_choices(rank, world_size):
    """On a rank where torch reports a GPU (faked): what the harness and the trainer pick."""
    import os

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from training.cluster.parallel import default_backend, init_parallel
    from training.config import ParallelConfig
    from training.train import _check_gpu_for_rank

    _fake_one_gpu()
    deepspeed.init_distributed(dist_backend=default_backend())  # DeepSpeed's comm over the harness' group
    init_parallel(ParallelConfig())  # no set_device, no NCCL
    _check_gpu_for_rank(type("Env", (), {"rank": rank, "local_rank": rank})())  # 2 ranks, "1 GPU": fine
    return {"backend": dist.get_backend(), "default": default_backend(), "ds": os.environ["DS_ACCELERATOR"],
            "accelerator": get_accelerator().device_name()}


def test_a_visible_gpu_does_not_move_the_cpu_suite_off_gloo(monkeypatch):
    """The CPU suite on a GPU machine: with torch.cuda.is_available() and the device count faked, the harness
    and the trainer's choices stay gloo and DeepSpeed's CPU accelerator."""
    from training.cluster.parallel import default_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert default_backend() == "gloo"  # conftest: DS_ACCELERATOR=cpu
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert default_backend() == "nccl"
    for result in run_distributed(_harness_choices, world_size=2):
        assert result == {"backend": "gloo", "default": "gloo", "ds": "cpu", "accelerator": "cpu"}


def test_test_sh_hides_gpus_from_the_suite():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "scripts", "test.sh")) as f:
        lines = [line.strip() for line in f]
    exported = lines.index("export CUDA_VISIBLE_DEVICES=")
    assert exported < next(i for i, line in enumerate(lines) if line.startswith("python -m pytest"))
