"""bf16 safety: the DeepSpeed config we build checks overflow explicitly and accumulates gradients in fp32;
a step with non-finite gradients (injected on one rank) is skipped by real DeepSpeed bf16 ZeRO 1 and 2 on
gloo, counted, and leaves the weights and optimizer state exactly as if that batch had never been seen;
an invalid norm (DeepSpeed's -1 sentinel) is never taken for a finite one."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from training.config import load_config
from training.setup_run import deepspeed_config
from training.train import step_applied

TINY = "training/configs/tiny/joint.yaml"


def test_bf16_ds_config_checks_overflow_and_accumulates_in_fp32():
    cfg = load_config(TINY, ["parallel.precision=bf16", "parallel.ds_config=ds_configs/zero2_fp32.json"])
    ds = deepspeed_config(cfg, SimpleNamespace(dp=2))
    # immediate_grad_update: each micro-batch's gradient counted once in DeepSpeed 0.19's bf16 optimizer
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True, "immediate_grad_update": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    ds = deepspeed_config(load_config(TINY), SimpleNamespace(dp=2))
    assert ds["bf16"]["enabled"] is False and "data_types" not in ds


def test_invalid_grad_norms_are_skipped_steps():
    assert step_applied(0.7, True)
    for norm in (-1.0, float("nan"), float("inf")):  # -1: DeepSpeed's invalid-norm sentinel
        assert not step_applied(norm, True), norm
    assert not step_applied(0.7, False)


def _batches(model_cfg, n_steps, micro, rank):
    from training.model.batch import collate
    out = []
    for step in range(n_steps):
        rng = np.random.default_rng(1000 * step + rank)
        out.append([collate([{"id": f"{step}.{m}.{i}", "task": ("speech", "music")[i % 2],
                              "text_ids": rng.integers(5, 20, size=3),
                              "codes": rng.integers(0, model_cfg.codebook_size,
                                                    size=(model_cfg.num_codebooks, 5 + i))}
                             for i in range(2)], model_cfg) for m in range(micro)])
    return out


def _train(cfg, model_cfg, steps, nan_step, rank):
    """Run the given steps ({step number: micro-batches}) the way training/train.py does; on `nan_step`
    rank 0's loss is NaN. -> (per step: applied, grad norm), fp32 weights and Adam moments, counters."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from training.cluster.parallel import init_parallel
    from training.model import AudioLM
    from training.stages import optimizer_param_groups, step_losses

    pg = init_parallel(cfg.parallel)
    torch.manual_seed(0)
    model = AudioLM(model_cfg, ep_group=pg.ep_group)
    opt = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, pg),
                                      mpu=pg.mpu)
    log = []
    for step, micro in steps.items():
        for mb in micro:
            loss, _, _ = step_losses(engine(mb), cfg, model_cfg, step, want_routing=False)
            if step == nan_step and rank == 0:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
        norm = float(engine.get_global_grad_norm())
        log.append((step_applied(norm, engine.was_step_applied()), norm))
    state = {name: safe_get_full_fp32_param(p) for name, p in model.named_parameters()}
    flat = [p for group in engine.optimizer.optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(flat):  # this rank's fp32 partitions: master weights and Adam moments
        state[f"partition{i}"] = p.detach().clone()
        state.update({f"partition{i}:{k}": v.clone() for k, v in engine.optimizer.optimizer.state[p].items()
                      if torch.is_tensor(v)})
    return log, state, engine.skipped_steps, next(model.parameters()).dtype


def _skip_vs_never_seen(rank, world_size, stages):
    import deepspeed

    from training.model import ModelConfig
    deepspeed.init_distributed(dist_backend="gloo")
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, num_codebooks=2, codebook_size=13,
                            delay_pattern="musicgen", text_vocab_size=30, vocab_pad_multiple=8,
                            moe={"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1,
                                 "input_jitter": 0.0},  # no RNG draws: a skipped batch leaves no trace
                            moe_layers=[1])
    results = {}
    for stage in stages:
        cfg = load_config(TINY, ["parallel.precision=bf16", f"parallel.zero_stage={stage}", "parallel.ep=1",
                                 "data.global_batch_size=8", "data.micro_batch_size=2"])
        b = _batches(model_cfg, 3, cfg.grad_accum(world_size), rank)
        with_nan = _train(cfg, model_cfg, {1: b[0], 2: b[1], 3: b[2]}, nan_step=2, rank=rank)
        never_seen = _train(cfg, model_cfg, {1: b[0], 3: b[2]}, nan_step=None, rank=rank)
        results[stage] = (with_nan, never_seen)
    return results


@pytest.mark.parametrize("stages", [(1, 2)], ids=["zero1+zero2"])
def test_bf16_nonfinite_step_is_skipped_and_leaves_no_trace(stages):
    """bf16, 2 data-parallel ranks, 2 micro-batches per step (fp32 accumulation), NaN on rank 0 at step 2:
    the step is skipped on both ranks and counted; after step 3 the fp32 weights and Adam moments equal a
    run that trained on steps 1 and 3 only (bitwise)."""
    results = run_distributed(_skip_vs_never_seen, world_size=2, args=(stages,), timeout=300)
    for rank_result in results:
        for stage, (with_nan, never_seen) in rank_result.items():
            (log, state, skipped, dtype), (log_ref, state_ref, skipped_ref, _) = with_nan, never_seen
            assert dtype == torch.bfloat16
            assert [applied for applied, _ in log] == [True, False, True], (stage, log)
            assert not math.isfinite(log[1][1]) or log[1][1] < 0
            assert skipped == 1 and skipped_ref == 0
            assert [n for _, n in log[::2]] == [n for _, n in log_ref], stage  # same norms, bitwise
            for key, value in state_ref.items():
                assert torch.equal(state[key], value), (stage, key)
