"""The demo's step counts: a fixed function of `--minutes`, never of how busy the machine is.

Specialists get n steps each (they run side by side, one process each), stage 2 n*STAGE2_RATIO,
stage 3 n*STAGE3_RATIO (2 processes each), and the joint baseline as many steps as it takes to see
as many training samples as the whole curriculum; n is the largest whose predicted time fits the budget
on an idle 2-core machine. The prediction uses the table below (IDLE), measured once as CPU seconds per
step and per launch (benchmarks/bench_demo_steps.py: process CPU time, one thread per process), which is
what each process takes of its core on an idle 2-core machine. A loaded machine runs the same steps
slower, so the demo takes longer there but trains (and compares) exactly the same models.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from training.config import REPO_ROOT, load_config

TINY = os.path.join(REPO_ROOT, "training", "configs", "tiny")

# CPU seconds (= idle wall seconds on 2 cores), tiny configs, from `python -m benchmarks.bench_demo_steps`
# (measured 2026-12-05: LAUNCH_S per process start, imports, deepspeed.initialize and final save).
LAUNCH_S = {1: 6.7, 2: 6.9}
DENSE_STEP_S = 0.30  # one process, batch 4 (the two specialists side by side, one core each)
STAGE2_STEP_S = 0.16  # two processes (EP=2), experts frozen
MOE_STEP_S = 0.18  # two processes (EP=2, DP=2), batch 4: stage 3 and the joint baseline
MIN_STEPS = 4
# Steps of stage 2 and stage 3 relative to one specialist's steps.
STAGE2_RATIO, STAGE3_RATIO = 0.5, 1.0


@dataclass
class StageRun:
    key: str  # run directory name under OUT/runs
    title: str
    config: str
    nproc: int
    moe: bool
    steps: int = 0
    overrides: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    batch: int = 0  # global batch size (samples per step), read from the config
    lr: float = 0.0  # peak learning rate, read from the config

    def out_dir(self, root: str) -> str:
        return os.path.join(root, "runs", self.key)


def make_stages() -> dict[str, StageRun]:
    stages = {
        "speech": StageRun("stage1_speech", "speech specialist (stage 1, dense)",
                           os.path.join(TINY, "stage1_speech.yaml"), 1, False),
        "music": StageRun("stage1_music", "music specialist (stage 1, dense)",
                          os.path.join(TINY, "stage1_music.yaml"), 1, False),
        "stage2": StageRun("stage2", "upcycled MoE, gates + shared trained (stage 2)",
                           os.path.join(TINY, "stage2.yaml"), 2, True),
        "stage3": StageRun("stage3", "curriculum model (stage 3)",
                           os.path.join(TINY, "stage3.yaml"), 2, True),
        "joint": StageRun("joint", "naive joint baseline (unbalanced, from scratch)",
                          os.path.join(TINY, "joint.yaml"), 2, True),
    }
    for st in stages.values():
        cfg = load_config(st.config)
        st.batch, st.lr = cfg.data.global_batch_size, cfg.optim.lr
    return stages


@dataclass(frozen=True)
class Estimates:
    overhead: dict = field(default_factory=lambda: dict(LAUNCH_S))
    dense_step: float = DENSE_STEP_S
    stage2_step: float = STAGE2_STEP_S
    moe_step: float = MOE_STEP_S

    def stage_seconds(self, st: StageRun) -> float:
        """Predicted idle wall seconds of one stage."""
        step = self.dense_step if not st.moe else (self.stage2_step if st.key == "stage2" else self.moe_step)
        return self.overhead[st.nproc] + st.steps * step


IDLE = Estimates()


def plan_steps(budget_s: float, stages: dict[str, StageRun], est: Estimates = IDLE) -> None:
    """Choose step counts so that all stages fit in `budget_s` idle seconds (the table above).

    Specialists get n steps each (they run side by side), stage 2 n*STAGE2_RATIO, stage 3
    n*STAGE3_RATIO, and the joint baseline as many steps as it takes to see as many samples as the
    whole curriculum.
    """
    sp, mu, s2, s3, jo = (stages[k] for k in ("speech", "music", "stage2", "stage3", "joint"))
    # wall(n) = launches + n * slope, with the joint steps = curriculum samples / joint batch
    overhead = est.overhead[1] + 3 * est.overhead[2]
    per_n_samples = sp.batch + mu.batch + STAGE2_RATIO * s2.batch + STAGE3_RATIO * s3.batch
    slope = (est.dense_step + STAGE2_RATIO * est.stage2_step + STAGE3_RATIO * est.moe_step
             + per_n_samples / jo.batch * est.moe_step)
    n = max(MIN_STEPS, math.floor((budget_s - overhead) / slope))
    sp.steps = mu.steps = n
    s2.steps = max(MIN_STEPS, round(n * STAGE2_RATIO))
    s3.steps = max(MIN_STEPS, round(n * STAGE3_RATIO))
    curriculum_samples = sum(st.steps * st.batch for st in (sp, mu, s2, s3))
    jo.steps = max(MIN_STEPS, round(curriculum_samples / jo.batch))


def predicted_seconds(stages: dict[str, StageRun], est: Estimates = IDLE) -> float:
    """Idle wall seconds of the whole plan (the specialists side by side)."""
    return est.stage_seconds(stages["speech"]) + sum(est.stage_seconds(stages[k])
                                                     for k in ("stage2", "stage3", "joint"))


def stage_timeout(st: StageRun, est: Estimates = IDLE) -> float:
    """Generous: 6x the predicted idle time plus 5 minutes (a loaded machine is slow, a hang is not)."""
    return 6 * est.stage_seconds(st) + 300


def steps_table(minutes: tuple = (3, 5, 8, 12, 20, 30)) -> list[dict]:
    """The step counts each --minutes gives (the README's table)."""
    rows = []
    for m in minutes:
        stages = make_stages()
        plan_steps(m * 60.0, stages)
        rows.append({"minutes": m, **{k: st.steps for k, st in stages.items()},
                     "idle_s": round(predicted_seconds(stages))})
    return rows
