"""slurm/launch.sh's retry policy without a SLURM: `srun` and `scontrol` are stand-ins on PATH that run the
task command and record a requeue. A config error (exit 2) is never retried; other failures are, boundedly.

Run: .venv/bin/pytest tests/test_launch_sh.py
"""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done   # srun's own options
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG"
"""


@pytest.mark.parametrize("code,requeued", [(2, False), (3, True)])
def test_config_errors_are_not_retried(tmp_path, code, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = (f"source {REPO}/slurm/launch.sh\nRUN_DIR={run_dir}\n"
              f"unimoe_stage bash -c 'echo attempt; exit {code}'\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "FAKE_LOG": str(tmp_path / "scontrol.log"),
           "SLURM_JOB_ID": "42", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_TASKS_PER_NODE": "1", "UNIMOE_RETRIES": "1"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert "attempt" in proc.stdout, proc.stderr
    log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    if requeued:
        assert proc.returncode == 0 and "requeue 42" in log, proc.stderr
    else:
        assert proc.returncode == 2 and log == "", proc.stderr
        assert "config error (exit 2): not retried" in proc.stderr
        assert not (run_dir / "slurm-42.failures").exists()
