"""Run a function on N gloo processes on CPU (or N NCCL processes, one GPU each) and collect what each
rank returns.

    def _check(rank, world_size, x):
        ...                      # torch.distributed is initialised (gloo)
        return {"out": tensor}   # anything torch.save can write

    results = run_distributed(_check, world_size=2, args=(x,))
    results[1]["out"]

The function must live at module level (it is pickled by name for spawn). A failure on any
rank fails the caller with that rank's traceback; a hang fails after `timeout` seconds.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.cluster.ports import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, out_dir: str,
            env: dict[str, str], backend: str) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
        dist.barrier()  # a rank that exits right after collectives can abort its peers
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence = (), timeout: float = 300,
                    env: dict[str, str] | None = None, backend: str = "gloo") -> list[Any]:
    """Spawn `world_size` ranks (gloo on CPU; "nccl": one GPU each) running `fn(rank, world_size, *args)`;
    return their results."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="unimoe-dist-") as out_dir:
        port = free_port()
        accelerator = "cuda" if backend == "nccl" else "cpu"
        child_env = {"DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1", **(env or {})}
        procs = [ctx.Process(target=_worker, daemon=False,
                             args=(r, world_size, port, fn, args, out_dir, child_env, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                results.append(None)
                if r not in hung:
                    errors.append(f"rank {r} exited with code {procs[r].exitcode} and wrote no result")
                continue
            record = torch.load(path, weights_only=False)
            if record["ok"]:
                results.append(record["result"])
            else:
                errors.append(f"rank {r} raised:\n{record['error']}")
        if hung:
            errors.insert(0, f"ranks {hung} still running after {timeout:.0f}s (killed)")
        if errors:
            raise AssertionError("distributed run failed\n" + "\n".join(errors))
        return results
