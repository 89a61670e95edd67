"""`--nproc N`: start N local training processes (a workstation without torchrun or SLURM).

Each child runs `python -m training.cli <argv>` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
set (local rank r trains on GPU r when the machine has GPUs, else on CPU). SIGTERM/SIGUSR1/SIGINT to the
parent are forwarded to the children (they save and exit 75); if one child fails, the others get
FAIL_GRACE_S to exit on their own, then are killed. Returns 75 if any child was preempted, else the first
positive exit code of a child that ended by itself (0 if all succeeded).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from training.cluster.ports import rendezvous_port
from training.config import REPO_ROOT

FAIL_GRACE_S = 30.0


def launch_local(argv: list[str], nproc: int) -> int:
    port = rendezvous_port(os.getpid())  # the range of training.cluster.ports, free on this host
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc)}
    env_base.setdefault("OMP_NUM_THREADS", "1")
    # DS_ACCELERATOR is left to each rank (training.train: cuda when it sees a GPU, else cpu)
    path = env_base.get("PYTHONPATH", "")
    env_base["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        env_base.pop(k, None)
    procs = []
    for r in range(nproc):
        env = {**env_base, "RANK": str(r), "LOCAL_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, "-m", "training.cli", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    killed: set[int] = set()
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, 0, 75) for c in codes):
                # a rank failed: after a clean error exit (e.g. 3, non-finite stop) the others follow on their
                # own; after a crash (killed by a signal) they would hang in a collective: stop them now
                crashed = any(c is not None and c < 0 for c in codes)
                failed_at = time.time() - (FAIL_GRACE_S if crashed else 0.0)
            if failed_at is not None and time.time() - failed_at > FAIL_GRACE_S:
                for i, p in enumerate(procs):  # stuck in a collective with the dead rank
                    if p.poll() is None:
                        p.kill()
                        killed.add(i)
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.wait() for p in procs]
    if 75 in codes:
        return 75
    own = [c for i, c in enumerate(codes) if c != 0 and i not in killed]
    if not own:
        return 0
    return next((c for c in own if c > 0), 1)  # e.g. 3 (non-finite) or 2 (config); 1 for a signal death
