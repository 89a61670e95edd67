"""CPU seconds per training step and per launch of the demo's tiny stages (training/demo/budget.py's table).

    python -m benchmarks.bench_demo_steps [--long 24]

Each stage runs twice as a `unimoe train` subprocess group (OMP_NUM_THREADS=1), for 4 and for --long steps;
the CPU time of the whole process tree (getrusage of the children: launcher, ranks, data workers) gives
    step_cpu_s    per process and step: (cpu(long) - cpu(4)) / (long - 4) / nproc
    launch_cpu_s  per process: (cpu(4) - 4 * step_cpu_s * nproc) / nproc
On an idle 2-core machine one process per core runs at its CPU time, so these are the idle wall seconds
the demo plans with; CPU time, unlike wall time, hardly depends on what else the machine runs.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

from training.config import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "training", "configs", "tiny")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _train(config: str, out: str, steps: int, nproc: int, *overrides: str) -> float:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "training.cli", "train", "--config", os.path.join(TINY, config),
           "--out", out, "--nproc", str(nproc), "--max-steps", str(steps), "--save-every", "0",
           f"max_steps={steps}", f"optim.schedule_steps={steps}", "optim.warmup_steps=1", *overrides]
    before = _children_cpu()
    subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return _children_cpu() - before


def measure(config: str, nproc: int, root: str, long: int, *overrides: str) -> dict:
    name = os.path.splitext(config)[0]
    short_cpu = _train(config, os.path.join(root, f"{name}_4"), 4, nproc, *overrides)
    long_cpu = _train(config, os.path.join(root, f"{name}_{long}"), long, nproc, *overrides)
    step = (long_cpu - short_cpu) / (long - 4) / nproc
    return {"nproc": nproc, "step_cpu_s": round(step, 3),
            "launch_cpu_s": round((short_cpu - 4 * step * nproc) / nproc, 2),
            "cpu_s": {"4": round(short_cpu, 2), str(long): round(long_cpu, 2)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--long", type=int, default=24)
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as root:
        out["dense"] = measure("stage1_speech.yaml", 1, root, args.long)
        _train("stage1_music.yaml", os.path.join(root, "music"), 4, 1)
        init = f"stage.init_from=[{os.path.join(root, 'stage1_speech_4')},{os.path.join(root, 'music')}]"
        out["stage2"] = measure("stage2.yaml", 2, root, args.long, init)
        out["moe"] = measure("joint.yaml", 2, root, args.long)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
