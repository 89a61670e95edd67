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
