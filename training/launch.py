"""`--nproc N`: start N local training processes (a workstation without torchrun or SLURM).

Each child runs `python -m training.cli <argv>` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
set. SIGTERM/SIGUSR1/SIGINT to the parent are forwarded to the children (they save and exit 75); if one
child fails, the others are stopped. Returns 75 if any child was preempted, else the worst exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], nproc: int) -> int:
    port = free_port()
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc)}
    env_base.setdefault("OMP_NUM_THREADS", "1")
    if "DS_ACCELERATOR" not in env_base:
        env_base["DS_ACCELERATOR"] = "cpu"
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
    try:
        codes = [None] * nproc
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    try:
                        codes[i] = p.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        continue
                    if codes[i] not in (0, 75):  # a failed rank: the others would hang in collectives
                        for q in procs:
                            if q.poll() is None:
                                q.kill()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if 75 in codes:
        return 75
    bad = [c for c in codes if c != 0]
    return (bad[0] if bad[0] > 0 else 1) if bad else 0
