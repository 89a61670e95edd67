"""Helpers for the end-to-end training tests: `unimoe train --nproc N` as a real process group (so that
kill -9 kills every rank), metrics.jsonl reading and waiting for a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "training", "configs", "tiny")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def train_cmd(config: str, out: str, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", "--config", os.path.join(TINY, config),
            "--out", out, "--nproc", str(nproc), *extra]


def start(cmd: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: killpg reaches every rank


def run(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to the end; on a timeout kill the whole process group (the launcher and every rank) and raise."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def metrics(run_dir: str) -> dict[int, dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out[rec["step"]] = rec
    return out


def wait_for_step(proc: subprocess.Popen, run_dir: str, step: int, timeout: float = 600) -> None:
    t0 = time.time()
    while step not in metrics(run_dir):
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}")
        if time.time() - t0 > timeout:
            kill_group(proc)
            raise AssertionError(f"no step {step} after {timeout}s")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 every process of the run (the launcher and its ranks), by the group we started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def assert_same_losses(a: dict, b: dict, steps, tol: float = 1e-6) -> None:
    for s in steps:
        for key in ("loss", "grad_norm"):
            assert abs(a[s][key] - b[s][key]) <= tol * max(1.0, abs(a[s][key])), \
                f"step {s} {key}: {a[s][key]} vs {b[s][key]}"


FAULTS = os.path.join(ROOT, "tests", "faults")


def fault_env(**variables: str) -> dict:
    """Environment that loads tests/faults/sitecustomize.py in every process, with its variables set."""
    return {"PYTHONPATH": FAULTS + os.pathsep + ROOT, **variables}
