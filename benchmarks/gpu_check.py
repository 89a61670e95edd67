"""The Python half of scripts/gpu_check.sh: the environment report, each step's verdict and the summary.

    python -m benchmarks.gpu_check install OUT WHEELS SITE ROOT
        pip install --no-index --no-deps --target SITE: the wheels whose distribution this python lacks
        (plus ALWAYS; every wheel with GPU_CHECK_REINSTALL=1), then the project at ROOT
        (--no-build-isolation: setuptools from the python or SITE);
        prints one JSON line; never touches the network
    python -m benchmarks.gpu_check env OUT                  OUT/env.json; exit 2 (and OUT/summary.json)
                                                            when torch sees no CUDA device
    python -m benchmarks.gpu_check step OUT NAME RC SECONDS [--junit XML]
        OUT/NAME.json from the step's log (OUT/logs/NAME.log: its last JSON line) or junit report; an
        error object when there is none; appends to OUT/steps.jsonl and rewrites OUT/summary.json; exit 0
        when the step passed
    python -m benchmarks.gpu_check plan-memory OUT
        the planner's predicted peak memory of one bf16 step vs measured on the GPU (benchmarks.bench_plan),
        one JSON line; exit 1 when off by more than 25%
    python -m benchmarks.gpu_check fail OUT REASON          OUT/summary.json saying why nothing ran

A step passes when its command exited 0 and left its JSON (for pytest: a junit report in which every test
passed; a skip is a failure, a required test did not run), and the JSON lists no failures
(`failures` of bench moe, `over_tolerance` of bench_precision, `ok: false`).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

PACKAGES = ("torch", "deepspeed", "megatron-core", "encodec", "soxr", "soundfile", "numpy", "pydantic",
            "sentencepiece", "safetensors")
NOT_STARTED = 200  # the exit code scripts/gpu_check.sh records for a step the budget left no time for
ALWAYS = {"packaging", "typing_extensions"}  # megatron-core and pydantic need newer ones than old images have
MODULES = {"deepspeed": "deepspeed", "megatron-core": "megatron.core", "encodec": "encodec", "soxr": "soxr",
           "soundfile": "soundfile"}


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {type(e).__name__}: {e}"


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _imports() -> dict:
    """Where each package we installed imports from, or why it does not import."""
    out = {}
    for name, module in MODULES.items():
        try:
            if name == "encodec":  # the project's import: torchaudio of another torch release is tolerated
                from data_prep.codec import import_encodec
                out[name] = os.path.dirname(import_encodec().__file__)
                continue
            out[name] = os.path.dirname(importlib.import_module(module).__file__)
        except Exception as e:  # reported, not hidden
            out[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
    return out


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def install(wheels: str, site: str, root: str) -> dict:
    """Offline install into `site` (see the module docstring); {"installed": [...], "present": [...], ...}."""
    import time

    have = {_norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    files = sorted(f for f in os.listdir(wheels) if f.endswith(".whl"))
    every = os.environ.get("GPU_CHECK_REINSTALL") == "1"
    pick = [f for f in files if every or {_norm(f.split("-")[0])} - (have - ALWAYS)]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--disable-pip-version-check", "--target", site]
    env = {**os.environ, "PIP_NO_INDEX": "1", "PYTHONPATH": os.pathsep.join([site, os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    result = {"wheels": wheels, "site": site, "installed": pick,
              "present": [f.split("-")[0] for f in files if f not in pick]}
    leftovers = [os.path.join(root, d) for d in ("build", "unimoe_audio.egg-info")
                 if not os.path.exists(os.path.join(root, d))]  # what the in-tree build adds to the checkout
    for what, args in (("wheels", [os.path.join(wheels, f) for f in pick]),
                       ("project", ["--no-build-isolation", root])):
        if not args:
            continue
        proc = subprocess.run(pip + args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            result["error"] = f"pip install of the {what} failed ({proc.returncode}): {proc.stderr[-2000:]}"
            break
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "versions": _versions(), "imports": _imports(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["nvidia_smi"] = _run(["nvidia-smi"])
    env["gpu_processes"] = _run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                                 "--format=csv,noheader"])
    return env


def _read_steps(out: str) -> list[dict]:
    path = os.path.join(out, "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_summary(out: str, reason: str | None = None) -> dict:
    steps = _read_steps(out)
    summary = {"ok": bool(steps) and reason is None and all(s["ok"] for s in steps),
               "reason": reason, "budget_s": float(os.environ.get("GPU_CHECK_BUDGET", "nan")),
               "steps": {s["name"]: s for s in steps},
               "failed": [s["name"] for s in steps if not s["ok"]]}
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


def junit_result(path: str) -> dict:
    """{"tests": [...], "passed": n, "not_passed": [...], "failures": [...]} from a junit report."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"no junit report ({e}): pytest was killed before writing it"}
    cases = []
    for c in root.iter("testcase"):
        outcome = next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")
        message = next((child.get("message", "") for child in c if child.tag != "system-out"), "")
        cases.append({"name": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time", 0)),
                      "outcome": outcome, **({"message": message[:500]} if message else {})})
    failures = [f"{c['name']}: {c['outcome']} {c.get('message', '')}".strip()
                for c in cases if c["outcome"] != "passed"]
    if not cases:
        failures.append("no test ran")
    return {"tests": cases, "passed": sum(c["outcome"] == "passed" for c in cases),
            "not_passed": [c["name"] for c in cases if c["outcome"] != "passed"], "failures": failures}


def last_json_line(log: str) -> dict | None:
    try:
        with open(log, errors="replace") as f:
            lines = [line for line in f if line.startswith("{")]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _log_tail(log: str, chars: int = 3000) -> str:
    try:
        with open(log, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def step_result(out: str, name: str, rc: int, seconds: float, junit: str | None = None) -> dict:
    log = os.path.join(out, "logs", f"{name}.log")
    if rc == NOT_STARTED:
        result = {"error": "not started: the budget was spent"}
    else:
        result = junit_result(junit) if junit else last_json_line(log)
    if result is None:
        result = {"error": "the step left no JSON"}
    reasons = list(result.get("failures") or []) + list(result.get("over_tolerance") or [])
    if "error" in result:
        reasons.append(result["error"])
    if result.get("ok") is False and not reasons:
        reasons.append("ok: false")
    if rc not in (0, NOT_STARTED):
        reasons.append({124: "killed at the deadline (SIGINT)", 137: "killed (SIGKILL after the deadline)",
                        130: "interrupted (SIGINT)"}.get(rc, f"exit code {rc}"))
    if rc != 0 or "error" in result:
        result = {**result, "exit_code": rc, "log_tail": _log_tail(log)}
    write_json(os.path.join(out, f"{name}.json"), result)
    return {"name": name, "ok": not reasons, "exit_code": rc, "seconds": round(seconds, 1),
            "why_failed": reasons, "result": result}


PLAN_TOLERANCE = 0.25  # as tests/test_plan.py's GPU test


def plan_memory() -> dict:
    from benchmarks.bench_plan import gpu_activation_check

    checks = [gpu_activation_check(frames) for frames in (768, 3840)]
    ratios = [c["activation_predicted_over_measured"] for c in checks]
    off = [r for r in ratios if abs(r - 1) > PLAN_TOLERANCE]
    return {"checks": checks, "predicted_over_measured": ratios, "tolerance": PLAN_TOLERANCE,
            "over_tolerance": [f"predicted/measured {r:.3f}" for r in off]}


def main(argv: list[str]) -> int:
    cmd, out = argv[0], argv[1]
    os.makedirs(out, exist_ok=True)
    if cmd == "fail":
        write_summary(out, reason=argv[2])
        return 2
    if cmd == "plan-memory":
        result = plan_memory()
        print(json.dumps(result))
        return 1 if result["over_tolerance"] else 0
    if cmd == "install":
        result = install(*argv[2:5])
        print(json.dumps(result))
        return 1 if "error" in result else 0
    if cmd == "env":
        env = environment()
        write_json(os.path.join(out, "env.json"), env)
        if not env["cuda_available"]:
            write_summary(out, reason=f"no CUDA device visible to torch {env['torch']} ({sys.executable})")
            return 2
        return 0
    if cmd == "step":
        name, rc, seconds = argv[2], int(argv[3]), float(argv[4])
        junit = argv[6] if argv[5:6] == ["--junit"] else None
        record = step_result(out, name, rc, seconds, junit)
        with open(os.path.join(out, "steps.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        write_summary(out)
        print(f"[gpu_check] {name}: {'passed' if record['ok'] else 'FAILED'} in {seconds:.0f} s"
              + ("" if record["ok"] else f" ({'; '.join(map(str, record['why_failed']))[:300]})"),
              file=sys.stderr)
        return 0 if record["ok"] else 1
    raise SystemExit(f"gpu_check: unknown command {cmd!r} (install, env, step, fail)")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
