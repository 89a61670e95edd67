"""The demo's time budget: step counts per stage from `--minutes` and measured launch/step times.

Specialists get n steps each (they run side by side, one process each), stage 2 n*STAGE2_RATIO,
stage 3 n*STAGE3_RATIO (2 processes each), and the joint baseline as many steps as it takes to see
as many training samples as the whole curriculum; n is the largest that fits the budget. After a
stage ran, `remeasure` corrects the estimates and `plan_steps(..., done=...)` re-plans the rest.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from training.config import REPO_ROOT, load_config

TINY = os.path.join(REPO_ROOT, "training", "configs", "tiny")

# Seconds on 2 idle CPU cores with the tiny configs, rounded up (measured: 10-15 s per launch and
# 0.6 / 0.35 s per step idle, up to 2x that on a busy machine); re-measured after stage 1 and 2.
LAUNCH_OVERHEAD_S = {1: 14.0, 2: 18.0}  # process start, imports, deepspeed.initialize, final save
DENSE_STEP_S = 0.6  # one process, batch 4, two specialists side by side
MOE_STEP_S = 0.4  # two processes (EP=2, DP=2), batch 4
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
    step_s: float | None = None  # measured time per step
    overhead_s: float | None = None  # measured fixed cost of the launch
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


@dataclass
class Estimates:
    overhead: dict = field(default_factory=lambda: dict(LAUNCH_OVERHEAD_S))
    dense_step: float = DENSE_STEP_S
    moe_step: float = MOE_STEP_S


def plan_steps(budget_s: float, est: Estimates, stages: dict[str, StageRun], done: tuple = ()) -> None:
    """Choose step counts so that the stages not in `done` fit in `budget_s` seconds.

    Specialists get n steps each (they run side by side), stage 2 n*STAGE2_RATIO, stage 3
    n*STAGE3_RATIO, and the joint baseline as many steps as it takes to see as many samples as the
    whole curriculum. `done` stages keep their step counts (the budget left is for the others).
    """
    sp, mu, s2, s3, jo = (stages[k] for k in ("speech", "music", "stage2", "stage3", "joint"))
    fixed_samples = sum(stages[k].steps * stages[k].batch for k in done)
    # wall(n) = overheads + n * slope, with the joint steps = curriculum samples / joint batch
    overhead, slope = 0.0, 0.0
    if "speech" not in done:
        overhead += est.overhead[1]
        slope += est.dense_step  # the two specialists run in parallel on one core each
    n_spec_samples = 0.0 if "speech" in done else sp.batch + mu.batch
    s2_steps = STAGE2_RATIO if "stage2" not in done else 0.0
    s3_steps = STAGE3_RATIO if "stage3" not in done else 0.0
    overhead += est.overhead[2] * (int("stage2" not in done) + int("stage3" not in done) + 1)
    slope += (s2_steps + s3_steps) * est.moe_step
    per_n_samples = n_spec_samples + s2_steps * s2.batch + s3_steps * s3.batch
    slope += per_n_samples / jo.batch * est.moe_step
    overhead += fixed_samples / jo.batch * est.moe_step
    n = max(MIN_STEPS, math.floor((budget_s - overhead) / max(slope, 1e-9)))
    if "speech" not in done:
        sp.steps = mu.steps = n
    if "stage2" not in done:
        s2.steps = max(MIN_STEPS, round(n * STAGE2_RATIO))
    if "stage3" not in done:
        s3.steps = max(MIN_STEPS, round(n * STAGE3_RATIO))
    curriculum_samples = sum(st.steps * st.batch for st in (sp, mu, s2, s3))
    jo.steps = max(MIN_STEPS, round(curriculum_samples / jo.batch))


def stage_timeout(est: Estimates, st: StageRun) -> float:
    """Generous: 4x the predicted wall time plus 5 minutes (a loaded machine is slow, a hang is not)."""
    predicted = est.overhead[st.nproc] + st.steps * (est.moe_step if st.moe else est.dense_step)
    return 4 * predicted + 300


def remeasure(est: Estimates, st: StageRun, steps: bool = True) -> None:
    """Update the estimates from a finished stage: its own kind (dense/MoE, 1/2 processes) takes the
    measured values, the other kind is scaled by the same factor (how fast this machine is right now).
    steps=False keeps the step times (stage 2 trains without expert gradients: its steps are faster
    than those of stage 3 and the joint baseline) and updates only the launch overheads."""
    old_step = est.moe_step if st.moe else est.dense_step
    old_overhead = est.overhead[st.nproc]
    if st.step_s is None:  # too few steps to time them: scale everything by wall / predicted
        factor = st.wall_s / (old_overhead + st.steps * old_step)
        step_factor = overhead_factor = min(max(factor, 0.25), 4.0)
    else:
        step_factor = min(max(st.step_s / old_step, 0.25), 4.0)
        overhead_factor = min(max(st.overhead_s / old_overhead, 0.25), 4.0)
    if steps:
        est.dense_step *= step_factor
        est.moe_step *= step_factor
    est.overhead = {k: v * overhead_factor for k, v in est.overhead.items()}
