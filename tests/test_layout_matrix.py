"""Every layout `validate()` accepts trains the same model: `unimoe train` at TP x EP x DP x ZeRO x precision
(sequence parallelism on and off) gives the step-1 loss and gradient norm of the one-process run (TP1, EP1,
DP1, ZeRO-2, fp32), and, with clipping active (norms ~6, grad_clip 1), the same losses for 3 steps.

Bounds: fp32 1e-5 relative; bf16 layouts 2e-2 relative against the same fp32 run (bf16 weights and
activations hold ~3 significant digits). ZeRO-1 and ZeRO-2 in bf16 at TP 2 agree to 1e-5 with each other.

The default run covers every pair of values (zero x precision, zero x tp, ... ; checked below) in 9 layouts,
one `unimoe train` each (about 2 minutes on 2 cores together); the full matrix and the 8-rank TP2 x EP2 x DP2
run are marked slow.
MoE layouts use the tiny joint config (ZeRO 0/1/2: DeepSpeed refuses MoE under ZeRO-3), the ZeRO-3 layouts
the dense stage-1 config; micro-batches are pinned to 2 samples so every layout sees the same batches.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest

from tests.train_runs import metrics, run, train_cmd

STEPS = 3
COMMON = [f"max_steps={STEPS}", "data.micro_batch_size=2", "logging.tensorboard=false",
          "checkpoint.save_every=0", "optim.grad_clip=1.0"]
FP32_TOL, BF16_TOL = 1e-5, 2e-2
EXPERT_HEAVY = ["moe.routed_ffn_size=256"]  # MoE layouts: experts hold most of the gradient norm


@dataclass(frozen=True)
class Layout:
    zero: int
    precision: str
    tp: int
    sp: bool  # sequence parallelism (TP 2 only)
    ep: int
    dp: int
    dense: bool = False  # the dense stage-1 model (ZeRO-3 layouts: DeepSpeed refuses MoE there)
    global_batch: int = 4

    @property
    def nproc(self) -> int:
        return self.tp * self.dp

    def overrides(self) -> list[str]:
        return [f"data.global_batch_size={self.global_batch}", f"parallel.zero_stage={self.zero}",
                f"parallel.precision={self.precision}",
                f"parallel.tp={self.tp}", f"parallel.ep={self.ep}",
                f"parallel.sequence_parallel={'true' if self.sp else 'false'}",
                f"parallel.ds_config=ds_configs/zero{max(self.zero, 1)}_{self.precision}.json"]

    def __str__(self):
        return (f"z{self.zero}-{self.precision}-tp{self.tp}{'sp' if self.sp else ''}-ep{self.ep}-dp{self.dp}"
                f"{'-dense' if self.dense else ''}")


def accepted(max_ranks: int = 4) -> list[Layout]:
    """The layouts validate() accepts on up to max_ranks CPU ranks (ZeRO-0 bf16 is refused)."""
    out = []
    for zero, prec, tp, ep, dp in itertools.product((0, 1, 2, 3), ("fp32", "bf16"), (1, 2), (1, 2), (1, 2)):
        if tp * dp > max_ranks or ep > dp or (zero == 0 and prec == "bf16") or (zero == 3 and ep > 1):
            continue
        for sp in ((True, False) if tp > 1 and zero != 3 else (False,)):
            out.append(Layout(zero, prec, tp, sp, ep, dp, dense=zero == 3))
    return out


# every pair of values of two dimensions that some accepted layout has, some default layout has
DEFAULT = [Layout(1, "bf16", 2, True, 1, 1), Layout(2, "bf16", 2, True, 1, 1),
           Layout(0, "fp32", 1, False, 2, 2), Layout(0, "fp32", 2, True, 1, 1),
           Layout(1, "bf16", 1, False, 2, 2), Layout(2, "fp32", 1, False, 2, 2),
           Layout(1, "fp32", 2, True, 2, 2), Layout(3, "fp32", 1, False, 1, 1, True),
           Layout(3, "bf16", 2, False, 1, 2, True)]
DIMS = ("zero", "precision", "tp", "sp", "ep", "dp")


def test_the_default_layouts_cover_every_pair_of_values():
    def pairs(layouts):  # (the dense flag follows from zero)
        return {(a, getattr(lay, a), b, getattr(lay, b)) for lay in layouts
                for a, b in itertools.combinations(DIMS, 2)}
    assert set(DEFAULT) <= set(accepted())
    assert pairs(accepted()) - pairs(DEFAULT) == set()


_RUNS: dict = {}


def _train(tmp_path_factory, layout: Layout) -> dict[int, dict]:
    """metrics.jsonl of `unimoe train` at this layout (once per session)."""
    if layout in _RUNS:
        return _RUNS[layout]
    out = str(tmp_path_factory.mktemp(str(layout)) / "run")
    config, model = ("stage1_speech.yaml", []) if layout.dense else ("joint.yaml", EXPERT_HEAVY)
    p = run(train_cmd(config, out, *COMMON, *model, *layout.overrides(), nproc=layout.nproc), timeout=600)
    assert p.returncode == 0, f"{layout}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    got = metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1)), f"{layout}: steps {sorted(got)}"
    assert all(r["skipped"] == 0 for r in got.values()), f"{layout}: skipped steps"
    assert os.path.exists(os.path.join(out, "checkpoints", f"step_{STEPS:08d}", "COMPLETE"))
    _RUNS[layout] = got
    return got


def _reference(tmp_path_factory, layout: Layout) -> dict[int, dict]:
    """The one-process fp32 run (TP1, EP1, DP1, ZeRO-2) of the layout's model and batch."""
    return _train(tmp_path_factory, Layout(2, "fp32", 1, False, 1, 1, layout.dense, layout.global_batch))


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def check_layout(tmp_path_factory, layout: Layout) -> None:
    got = _train(tmp_path_factory, layout)
    ref = _reference(tmp_path_factory, layout)
    tol = FP32_TOL if layout.precision == "fp32" else BF16_TOL
    assert ref[1]["grad_norm"] > 2.0, "clipping (grad_clip 1) must be active for this test to mean anything"
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm") if step == 1 else ("loss",):
            assert _close(got[step][key], ref[step][key], tol), \
                f"{layout} step {step} {key}: {got[step][key]} vs one process {ref[step][key]}, tol {tol}"


@pytest.mark.parametrize("layout", DEFAULT, ids=str)
def test_layout_trains_the_same_model(tmp_path_factory, layout):
    check_layout(tmp_path_factory, layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [lay for lay in accepted() if lay not in DEFAULT], ids=str)
def test_layout_trains_the_same_model_full_matrix(tmp_path_factory, layout):
    check_layout(tmp_path_factory, layout)


@pytest.mark.slow
def test_tp2_ep2_dp2_on_8_ranks(tmp_path_factory):
    """8 ranks: TP 2 x EP 2 x DP 2 with sequence parallelism: expert-data-parallel groups of 2."""
    check_layout(tmp_path_factory, Layout(2, "fp32", 2, True, 2, 4, global_batch=8))


def test_zero0_bf16_is_refused_before_any_process_group(tmp_path, capsys):
    from training.cli import main
    out = str(tmp_path / "run")
    cmd = train_cmd("joint.yaml", out, "parallel.zero_stage=0", "parallel.precision=bf16")[3:]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "parallel.zero_stage=0 with precision=bf16" in err and "use zero_stage 1 or 2" in err
    assert not os.path.exists(out)  # refused before the ranks (and their process group) started


def test_zero1_and_zero2_bf16_count_the_experts_once_at_tp2(tmp_path):
    """ZeRO-1 bf16 (DeepSpeed's bf16 optimizer) and ZeRO-2 bf16 compute the same gradients (one micro-batch
    per step: ZeRO-2 accumulates micro-batches in bf16, the bf16 optimizer in fp32), so their norms agree
    (measured 2.5e-7 relative); the bf16 optimizer summed the experts' norm over TP when DeepSpeed was told
    the experts were TP-split (~1e-4 relative on this expert-heavy model)."""
    norms = {}
    for zero in (1, 2):
        out = str(tmp_path / f"z{zero}")
        layout = Layout(zero, "bf16", 2, True, 1, 1)
        p = run(train_cmd("joint.yaml", out, *COMMON, *EXPERT_HEAVY, *layout.overrides(), "max_steps=1",
                          "data.micro_batch_size=4", nproc=2), timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        norms[zero] = metrics(out)[1]["grad_norm"]
    assert abs(norms[1] - norms[2]) <= 1e-5 * norms[2], norms
