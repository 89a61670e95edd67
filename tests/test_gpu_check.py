"""scripts/gpu_check.sh on a CPU machine: the offline install (PIP_NO_INDEX=1, an apt-get that fails, no
proxy that answers) of a wheelhouse made by scripts/gpu_wheels.sh for this Python, env.json with the
installed deepspeed and megatron-core, exit 2 with summary.json saying no CUDA; no torch: exit 2 and the
reason; each step's verdict (benchmarks/gpu_check.py); bench_precision's tolerances on CPU.
The full wheelhouse into a fresh venv that has only torch is the slow test at the end.

Run: .venv/bin/pytest tests/test_gpu_check.py
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu_check import step_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


def _offline_env(tmp_path, python: str) -> dict:
    shims = tmp_path / "shims"
    shims.mkdir()
    apt = shims / "apt-get"
    apt.write_text(f"#!/bin/sh\ntouch {tmp_path / 'apt-get-was-called'}\nexit 100\n")
    apt.chmod(0o755)
    return {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PIP_NO_INDEX": "1",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_PYTHON": python, "GPU_CHECK_SITE": str(tmp_path / "site")}


def _wheelhouse(out, *flags):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_wheels.sh"), "--python-version", PYVER,
                           *flags, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _gpu_check(tmp_path, env, *flags):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), *flags, "--budget", "120",
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_offline_install_writes_env_json_and_exits_2_without_cuda(tmp_path):
    wheels = _wheelhouse(tmp_path / "wheels", "--only", "deepspeed,megatron-core,hjson")
    lock = (wheels / "requirements.lock").read_text()
    assert "deepspeed==" in lock and "megatron-core==" in lock and "torch==" in lock
    env = _offline_env(tmp_path, sys.executable)
    proc, out = _gpu_check(tmp_path, env, "--wheels", str(wheels), "--reinstall")
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["reason"].startswith("no CUDA device visible to torch")
    assert summary["steps"]["install"]["ok"], summary["steps"]["install"]
    site = str(tmp_path / "site")
    installed = summary["steps"]["install"]["result"]["installed"]
    assert sorted(w.split("-")[0] for w in installed) == ["deepspeed", "hjson", "megatron_core"]
    env_json = json.loads((out / "env.json").read_text())
    pins = dict(line.split("==") for line in lock.splitlines() if "==" in line)
    assert env_json["versions"]["deepspeed"] == pins["deepspeed"]
    assert env_json["versions"]["megatron-core"] == pins["megatron-core"]
    assert env_json["imports"]["deepspeed"].startswith(site)  # from the wheelhouse, not the venv
    assert env_json["imports"]["megatron-core"].startswith(site)
    assert os.path.isdir(os.path.join(site, "unimoe_audio-0.1.0.dist-info"))  # the project, built offline
    assert env_json["cuda_available"] is False and "nvidia_smi" in env_json
    assert not (tmp_path / "apt-get-was-called").exists()


def test_no_torch_exits_2_with_the_reason(tmp_path):
    python = tmp_path / "python-without-site-packages"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages, no torch
    python.chmod(0o755)
    proc, out = _gpu_check(tmp_path, _offline_env(tmp_path, str(python)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["reason"].startswith(f"no torch in {python}")
    assert not (out / "env.json").exists()


def _junit(path, cases):
    body = "".join(f'<testcase classname="tests.t" name="{name}" time="1.0">{inner}</testcase>'
                   for name, inner in cases)
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return str(path)


def test_step_verdicts(tmp_path):
    (tmp_path / "logs").mkdir()
    ok = _junit(tmp_path / "ok.xml", [("a", ""), ("b", "")])
    assert step_result(str(tmp_path), "p", 0, 1.0, ok)["ok"]
    skipped = _junit(tmp_path / "s.xml", [("a", ""), ("b", '<skipped message="needs a CUDA device"/>')])
    record = step_result(str(tmp_path), "p", 0, 1.0, skipped)
    assert not record["ok"] and record["why_failed"] == ["tests.t::b: skipped needs a CUDA device"]
    record = step_result(str(tmp_path), "p", 124, 9.0, str(tmp_path / "missing.xml"))
    assert not record["ok"] and "killed at the deadline (SIGINT)" in record["why_failed"]
    assert "no junit report" in json.loads((tmp_path / "p.json").read_text())["error"]

    log = tmp_path / "logs" / "bench.log"
    log.write_text('some lines\n{"failures": ["1 token(s) dropped"], "x": 1}\n')
    record = step_result(str(tmp_path), "bench", 1, 2.0)
    assert not record["ok"] and record["why_failed"] == ["1 token(s) dropped", "exit code 1"]
    log.write_text('{"over_tolerance": [], "ok": true}\n')
    assert step_result(str(tmp_path), "bench", 0, 2.0)["ok"]
    log.write_text("Traceback ... CUDA out of memory\n")
    record = step_result(str(tmp_path), "bench", 1, 2.0)
    written = json.loads((tmp_path / "bench.json").read_text())  # an error object, never an empty file
    assert not record["ok"] and written["error"] == "the step left no JSON"
    assert "out of memory" in written["log_tail"]


def test_bf16_matches_fp32_within_the_stated_tolerances_on_cpu():
    from benchmarks.bench_precision import TOLERANCES, run

    res = run("cpu", small=True)
    assert res["ok"] and res["same_routing"], res
    assert set(TOLERANCES) <= set(res) and all(0 < res[k] <= TOLERANCES[k] for k in TOLERANCES)


@pytest.mark.slow
def test_full_wheelhouse_installs_offline_into_a_venv_with_only_torch(tmp_path):
    """The wheelhouse gpu_wheels.sh makes by default (for this Python) into a fresh venv that has nothing
    but this torch build: everything installs offline and deepspeed, megatron-core, encodec, soxr and
    soundfile import."""
    import torch

    wheels = _wheelhouse(tmp_path / "wheels")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__}"], check=True,
                   timeout=1200)
    proc, out = _gpu_check(tmp_path, _offline_env(tmp_path, python), "--wheels", str(wheels))
    assert proc.returncode == 2, proc.stderr[-3000:]
    env_json = json.loads((out / "env.json").read_text())
    site = str(tmp_path / "site")
    assert all(path.startswith(site) for path in env_json["imports"].values()), env_json["imports"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["install"]["ok"] and summary["reason"].startswith("no CUDA device")


def test_one_deadline_a_step_running_at_it_is_interrupted_the_next_not_started(tmp_path):
    """A dry run on the CPU (GPU_CHECK_DEVICE=cpu) of two steps, bench_moe (made to hang: the python the
    check uses sleeps instead of running the benchmark) and train_fixture, with a 30 s budget: bench_moe gets
    what is left after env.json, is interrupted with SIGINT at the deadline, train_fixture is not started;
    each leaves a JSON object (an error object) and summary.json lists both, so a run cut at its deadline
    still says what happened."""
    python = tmp_path / "python-whose-bench-moe-hangs"
    python.write_text(f'#!/bin/sh\ncase "$*" in *"bench moe"*) exec {sys.executable} -c "import time; '
                      f'time.sleep(600)";; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**_offline_env(tmp_path, str(python)), "GPU_CHECK_DEVICE": "cpu",
           "GPU_CHECK_STEPS": "bench_moe train_fixture"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--budget", "30", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == ["bench_moe", "train_fixture"] and summary["ok"] is False
    moe, train = summary["steps"]["bench_moe"], summary["steps"]["train_fixture"]
    assert moe["exit_code"] == 124, moe
    assert moe["why_failed"] == ["the step left no JSON", "killed at the deadline (SIGINT)"]
    error = json.loads((out / "bench_moe.json").read_text())
    assert error["exit_code"] == 124 and "KeyboardInterrupt" in error["log_tail"]  # SIGINT, not SIGKILL
    assert train["why_failed"] == ["not started: the budget was spent"]
    assert json.loads((out / "train_fixture.json").read_text())["error"] == train["why_failed"][0]
    assert json.loads((out / "env.json").read_text())["cuda_available"] is False
