"""What makes a layout fit, by the planner itself: the settings `unimoe plan` may change (activation
recompute, micro-batch, TP x EP layout), the fastest combination that fits (how the shipped stage configs
are chosen; tests/test_plan.py holds them to it), and the hints printed when a config's own layout does not
fit. Every hint is a change re-planned under the same assumptions, named only when it makes the layout fit:
no "raise zero_stage" for an MoE model (DeepSpeed refuses MoE under ZeRO-3), no "more GPUs" when the
activations, which more GPUs do not shrink, are what overflows.
"""

from __future__ import annotations

import dataclasses

from training.cluster.plan_memory import GiB, Workload, memory_per_gpu
from training.cluster.plan_time import Assumptions, Hardware, Layout, step_time
from training.config import TrainConfig, divisors
from training.model.lm import RECOMPUTE

_LESS_MEMORY = ("none", "moe", "block")  # model.recompute, from the most activation memory to the least


def with_settings(cfg: TrainConfig, w: Workload, recompute: str | None = None, micro: int | None = None,
                  zero_stage: int | None = None, seq_len: int | None = None) -> tuple[TrainConfig, Workload]:
    """The config and workload with some of the settings changed (None: as they are)."""
    recompute = w.recompute if recompute is None else recompute
    micro = cfg.data.micro_batch_size if micro is None else micro
    zero_stage = w.zero_stage if zero_stage is None else zero_stage
    c = dataclasses.replace(cfg, model={**cfg.model, "recompute": recompute},
                            data=dataclasses.replace(cfg.data, micro_batch_size=micro),
                            parallel=dataclasses.replace(cfg.parallel, zero_stage=zero_stage))
    return c, dataclasses.replace(w, recompute=recompute, micro_batch=micro, zero_stage=zero_stage,
                                  seq_len=seq_len or w.seq_len)


def fits(cfg: TrainConfig, w: Workload, world: int, tp: int, ep: int, hw: Hardware,
         a: Assumptions) -> float | None:
    """GiB per GPU of TP=tp, EP=ep on `world` GPUs when it can run and fits, else None."""
    if world % tp or cfg.layout_problems(world, tp, ep):
        return None
    total = memory_per_gpu(w, world, tp, ep, a.overhead_gib)["total"]
    return total / GiB if total <= hw.memory_gib * GiB else None


def fitting_settings(cfg: TrainConfig, w: Workload, world: int, hw: Hardware, a: Assumptions) -> list[dict]:
    """Every recompute x micro-batch x TP x EP combination that runs and fits on `world` GPUs, fastest
    first: {"recompute", "micro", "tp", "ep", "dp", "gib", "step_s", "mfu"}."""
    recomputes = [r for r in RECOMPUTE if cfg.is_moe or r != "moe"]
    micros = sorted({m for tp in divisors(world) for m in divisors(max(cfg.data.global_batch_size
                                                                       // (world // tp), 1))})
    out = []
    for r in recomputes:
        for m in micros:
            c, wv = with_settings(cfg, w, recompute=r, micro=m)
            for tp in divisors(world):
                for ep in divisors(world // tp) if cfg.is_moe else [1]:
                    gib = fits(c, wv, world, tp, ep, hw, a)
                    if gib is None:
                        continue
                    t = step_time(wv, Layout(tp, ep, world // tp), hw, a)
                    out.append({"recompute": r, "micro": m, "tp": tp, "ep": ep, "dp": world // tp, "gib": gib,
                                "step_s": t["step_s"], "mfu": t["mfu"]})
    return sorted(out, key=lambda s: s["step_s"])


def _describe(s: dict) -> str:
    return (f"model.recompute={s['recompute']} data.micro_batch_size={s['micro']} parallel.tp={s['tp']} "
            f"parallel.ep={s['ep']} ({s['gib']:.1f} GiB, {s['step_s']:.3f} s/step, MFU {s['mfu']:.3f})")


def fit_hints(cfg: TrainConfig, w: Workload, world: int, hw: Hardware, a: Assumptions) -> list[str]:
    """Changes that make the config's layout (or, failing that, any layout) fit on `world` GPUs, each one
    checked by planning it; [] when nothing the planner can change does."""
    p = cfg.parallel
    tp, ep = p.tp, p.ep
    hints = []
    possible = world % tp == 0 and not cfg.layout_problems(world, tp, ep)
    if possible:
        for r in _LESS_MEMORY[_LESS_MEMORY.index(w.recompute) + 1:]:
            if r == "moe" and not cfg.is_moe:
                continue
            gib = fits(*with_settings(cfg, w, recompute=r), world, tp, ep, hw, a)
            if gib is not None:
                hints.append(f"model.recompute={r}: activations recomputed in backward ({gib:.1f} GiB/GPU)")
        micro = cfg.micro_batch_size(world // tp)
        for m in sorted((d for d in divisors(micro) if d < micro), reverse=True):
            gib = fits(*with_settings(cfg, w, micro=m), world, tp, ep, hw, a)
            if gib is not None:
                hints.append(f"data.micro_batch_size={m}: fewer samples per forward pass ({gib:.1f} GiB/GPU)")
                break
        seq = w.seq_len // 2
        while seq >= 256:
            gib = fits(*with_settings(cfg, w, seq_len=seq), world, tp, ep, hw, a)
            if gib is not None:
                hints.append(f"--seq-len {seq} (model.max_seq_len={seq}, or a data.batch_tokens budget of "
                             f"{seq * micro} per micro-batch): shorter samples ({gib:.1f} GiB/GPU)")
                break
            seq //= 2
        if not cfg.is_moe and w.zero_stage < 3:  # DeepSpeed refuses MoE under ZeRO-3
            z = w.zero_stage + 1
            gib = fits(*with_settings(cfg, w, zero_stage=z), world, tp, ep, hw, a)
            if gib is not None:
                hints.append(f"parallel.zero_stage={z}: more of the model states sharded ({gib:.1f} GiB/GPU)")
        for more in (2 * world, 4 * world):
            gib = fits(cfg, w, more, tp, ep, hw, a)
            if gib is not None:
                hints.append(f"--gpus {more}: the model states shard over more GPUs ({gib:.1f} GiB/GPU)")
                break
    best = fitting_settings(cfg, w, world, hw, a)
    same = [s for s in best if s["recompute"] == w.recompute and s["micro"] == cfg.micro_batch_size(s["dp"])]
    if same:
        hints.append(f"parallel.tp={same[0]['tp']} parallel.ep={same[0]['ep']}: the fastest layout that fits "
                     f"as configured ({same[0]['gib']:.1f} GiB, {same[0]['step_s']:.3f} s/step)")
    if best:
        hints.append("fastest that fits, all settings: " + _describe(best[0]))
    return hints


def target_memory(cfg: TrainConfig) -> tuple[float, float]:
    """(GiB per GPU of the config's own layout at its target cluster.gpus x cluster.gpu, the GPU's GiB)
    under the default assumptions; ConfigError when the config states no target or cannot run there."""
    from training.cluster.gpus import GPUS
    from training.cluster.plan_memory import workload_from_config
    from training.config import ConfigError

    c = cfg.cluster
    if not c.gpus:
        raise ConfigError("the config states no target (cluster.gpus)")
    problems = cfg.layout_problems(c.gpus)
    if problems:
        raise ConfigError(f"its layout cannot run on its target cluster.gpus={c.gpus}: {problems[0]}")
    hw = dataclasses.replace(GPUS[c.gpu], gpus_per_node=c.gpus_per_node)
    mem = memory_per_gpu(workload_from_config(cfg), c.gpus, cfg.parallel.tp, cfg.parallel.ep,
                         Assumptions().overhead_gib)
    return mem["total"] / GiB, hw.memory_gib
