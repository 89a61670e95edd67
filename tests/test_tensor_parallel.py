"""Tensor and sequence parallelism (megatron-core layers on gloo) against the model on one rank: TP=2
equals TP=1 for logits, losses (aux included) and gradients, with and without sequence parallelism (SP:
each TP rank's MoE layer routes half of the tokens) and with recomputation; under deepspeed.initialize
(ZeRO 1 and 2, TP=2 and TP=2 x EP=2) DeepSpeed's gradient norm and the clipped training losses equal
those of the whole model on one rank; shard/merge of state dicts round-trips."""

import math

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from training.model import AudioLM, ModelConfig
from training.model.tensor_parallel import check_tp_size, merge_state_dicts, shard_kind, shard_state_dict

MOE = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1, "top_p": 0.7,
       "input_jitter": 0.0}
AUX_WEIGHTS = (0.01, 0.1)  # balance, z


def tiny_cfg(moe=None, **kw):
    base = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, num_codebooks=2, codebook_size=13,
                delay_pattern="musicgen", text_vocab_size=30, vocab_pad_multiple=8, max_seq_len=64)
    if moe is not None:
        base.update(moe=moe, moe_layers=[1])
    return ModelConfig(**{**base, **kw})


def make_samples(cfg, n, seed):
    rng = np.random.default_rng(seed)
    return [{"id": f"s{i}", "task": ("speech", "music")[i % 2],
             "text_ids": rng.integers(5, cfg.text_vocab_size, size=3),
             "codes": rng.integers(0, cfg.codebook_size, size=(cfg.num_codebooks, 4 + i))} for i in range(n)]


def total_loss(out):
    """LM loss + weighted router losses: the objective whose gradients the tests compare."""
    loss = out.loss
    for a in out.aux:
        loss = loss + AUX_WEIGHTS[0] * a.balance_loss + AUX_WEIGHTS[1] * a.z_loss
    return loss


def test_shard_merge_round_trip():
    cfg = tiny_cfg()
    full = AudioLM(cfg).state_dict()
    shards = [shard_state_dict(full, cfg, r, 2) for r in range(2)]
    assert shard_kind("layers.0.attn.qkv_proj.weight") == "qkv"
    assert shard_kind("layers.1.ffn.experts.3.gate_proj.weight") is None  # experts are replicated over TP
    assert shards[0]["layers.0.ffn.gate_proj.weight"].shape[0] == cfg.ffn_hidden_size // 2
    merged = merge_state_dicts(shards, cfg)
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_check_tp_size():
    with pytest.raises(ValueError, match="num_kv_heads = 2"):
        check_tp_size(tiny_cfg(), 4)


def _full_grads(model, cfg, group, world_size):
    from training.model.tensor_parallel import merge_tensors
    grads = {}
    for name, p in model.named_parameters():
        g, kind = p.grad, shard_kind(name)
        if kind is not None:
            parts = [torch.empty_like(g) for _ in range(world_size)]
            torch.distributed.all_gather(parts, g.contiguous(), group=group)
            g = merge_tensors(parts, kind, cfg)
        grads[name] = g
    return grads


def _tp_vs_full(rank, world_size, cfg, sequence_parallel):
    from megatron.core import parallel_state as ps

    from training.model.batch import collate
    from training.model.tensor_parallel import gather_full_state_dict, gather_vocab, parallelize

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = ps.get_tensor_model_parallel_group()
    torch.manual_seed(0)
    ref = AudioLM(cfg).train()
    tp_model = AudioLM(cfg).train()
    tp_model.load_state_dict(ref.state_dict())
    parallelize(tp_model, sequence_parallel=sequence_parallel)
    batch = collate(make_samples(cfg, 3, seed=1), cfg)
    out_ref = ref(batch)
    total_loss(out_ref).backward()
    out = tp_model(batch)
    total_loss(out).backward()
    ref_grads = dict(ref.named_parameters())
    grads = {k: (g - ref_grads[k].grad).abs().max().item()
             for k, g in _full_grads(tp_model, cfg, group, world_size).items()}
    logits = gather_vocab(out.logits)
    full = gather_full_state_dict(tp_model)
    same_state = all(torch.equal(full[k], v) for k, v in ref.state_dict().items()) and full.keys() == \
        ref.state_dict().keys()
    aux = [max(abs(float(getattr(a, n) - getattr(r, n))) for n in ("balance_loss", "z_loss", "entropy_loss"))
           for a, r in zip(out.aux, out_ref.aux)]
    ps.destroy_model_parallel()
    return {"logits": (logits - out_ref.logits).abs().max().item(),
            "loss": (out.loss - out_ref.loss).abs().item(), "aux": max(aux, default=0.0),
            "tasks": max((out.loss_per_task[t] - out_ref.loss_per_task[t]).abs().item()
                         for t in out_ref.loss_per_task),
            "grads": grads, "local_vocab": out.logits.shape[-1], "same_state": same_state,
            "tokens": batch["text"].numel(), "selected": [a.selected for a in out.aux],
            "ref_selected": [a.selected for a in out_ref.aux]}


def _tp_layer_devices(rank, world_size, cfg):
    """parallelize() of a model that lives on another device than the CPU megatron-core builds its layers
    on (the meta device here, CUDA in training and the TP benchmark): where its parameters end up."""
    from megatron.core import parallel_state as ps

    from training.model.tensor_parallel import parallelize

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    with torch.device("meta"):
        model = AudioLM(cfg)
    parallelize(model, sequence_parallel=True)
    ps.destroy_model_parallel()
    return sorted({p.device.type for p in model.parameters()})


def _tp_checks(rank, world_size, cases, jitter_cfg):
    checks = [_tp_vs_full(rank, world_size, cfg, sp) for cfg, sp in cases]
    return checks, _tp_jitter(rank, world_size, jitter_cfg), _tp_layer_devices(rank, world_size, cases[0][0])


def test_tp2_equals_tp1_with_and_without_sequence_parallel():
    """TP=2 == TP=1 (logits, losses incl. the router losses, gradients) for a dense and an MoE layer, with
    sequence parallelism (alone and with recomputation) and without. With SP each TP rank's MoE layer
    routes half of the tokens (the batch has an odd token count: padded by one row), together exactly the
    TP=1 decisions; without SP, with router jitter on, the replicated MoE layer routes identically on every
    TP rank. One pair of gloo processes runs all checks (process start-up dominates)."""
    moe = tiny_cfg(moe=MOE)
    cases = {"dense sp": (tiny_cfg(), True), "moe sp": (moe, True),
             "moe sp recompute=block": (tiny_cfg(moe=MOE, recompute="block"), True),
             "moe sp recompute=moe": (tiny_cfg(moe=MOE, recompute="moe"), True), "moe no sp": (moe, False)}
    jitter_cfg = tiny_cfg(moe={**MOE, "input_jitter": 0.5})
    results = run_distributed(_tp_checks, world_size=2, args=(list(cases.values()), jitter_cfg))
    a, b = results[0][1], results[1][1]
    assert torch.equal(a["selected"], b["selected"]) and torch.equal(a["loss"], b["loss"])
    assert [r[2] for r in results] == [["meta"], ["meta"]]  # TP layers on the original weights' device
    for rank_results, _, _ in results:
        for (variant, (cfg, _)), r in zip(cases.items(), rank_results):
            assert r["local_vocab"] == cfg.padded_audio_vocab_size // 2
            assert r["same_state"], variant  # gathered shards == the full weights
            assert r["logits"] < 1e-5 and r["loss"] < 1e-5 and r["tasks"] < 1e-5, (variant, r)
            assert r["aux"] < 1e-6, (variant, r["aux"])
            bad = {k: v for k, v in r["grads"].items() if v > 1e-5}
            assert not bad, (variant, bad)
    for i, (variant, (cfg, sp)) in enumerate(cases.items()):
        if not cfg.is_moe:
            continue
        r0, r1 = results[0][0][i], results[1][0][i]
        n = r0["tokens"]
        assert n % 2 == 1  # the padded case
        for sel0, sel1, ref in zip(r0["selected"], r1["selected"], r0["ref_selected"]):
            if sp:  # routing counts: each TP rank routed ceil(n / 2) rows, together the n tokens once
                assert sel0.shape[0] == sel1.shape[0] == (n + 1) // 2, variant
                assert torch.equal(torch.cat([sel0, sel1])[:n], ref), variant
            else:
                assert sel0.shape[0] == n and torch.equal(sel0, ref) and torch.equal(sel1, ref), variant


def _tp_jitter(rank, world_size, cfg):
    from megatron.core import parallel_state as ps

    from training.model.batch import collate
    from training.model.tensor_parallel import parallelize

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    torch.manual_seed(0)
    model = parallelize(AudioLM(cfg), sequence_parallel=False).train()
    torch.manual_seed(1000 + rank)  # per-rank seeds, as trainers often set them
    out = model(collate(make_samples(cfg, 3, seed=1), cfg))
    ps.destroy_model_parallel()
    return {"selected": out.aux[0].selected, "loss": out.loss.detach()}


LR, CLIP, STEPS = 3e-3, 0.5, 3


def _routed_pairs(out, cfg):
    return sum(int(a.selected[:, : cfg.moe_config().num_routed_experts].sum()) for a in out.aux)


def _reference_run(cfg, state, dp, steps):
    """The whole model on one rank: per step the mean over the DP ranks' batches of the total loss, the
    gradient norm, DeepSpeed's clipping rule and AdamW. -> per step ([loss of DP rank d], norm, [routed
    (token, expert) pairs of DP rank d's batch])."""
    from training.model.batch import collate
    model = AudioLM(cfg).train()
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    history = []
    for step in range(steps):
        outs = [model(collate(make_samples(cfg, 2, seed=100 * step + d), cfg)) for d in range(dp)]
        (sum(total_loss(o) for o in outs) / dp).backward()
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
        clip = (norm + 1e-6) / CLIP  # deepspeed.runtime.zero.stage_1_and_2.unscale_and_clip_grads
        if clip > 1:
            for p in model.parameters():
                p.grad.div_(clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(([o.loss.item() for o in outs], norm, [_routed_pairs(o, cfg) for o in outs]))
    return history


def _deepspeed_vs_reference(rank, world_size, tp, ep, stages):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from training.cluster.parallel import init_parallel
    from training.config import ParallelConfig
    from training.model.batch import collate
    from training.model.tensor_parallel import parallelize

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group run_distributed started
    pg = init_parallel(ParallelConfig(tp=tp, ep=ep, backend="gloo"))
    cfg = tiny_cfg(ffn_hidden_size=64, moe={**MOE, "routed_ffn_size": 32, "shared_ffn_size": 16})
    torch.manual_seed(0)
    state = AudioLM(cfg).state_dict()
    reference = _reference_run(cfg, state, pg.dp, STEPS)
    runs = {}
    for stage in stages:
        model = AudioLM(cfg, ep_group=pg.ep_group).train()
        own = model.state_dict()
        model.load_state_dict({k: state[k] for k in own})  # this rank's experts
        parallelize(model)
        groups = split_params_into_different_moe_groups_for_optimizer(
            [{"params": list(model.parameters()), "name": "params"}])
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage}, "gradient_clipping": CLIP,
                     "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=LR),
                                          config=ds_config, mpu=pg.mpu)
        history = []
        for step in range(STEPS):
            out = engine(collate(make_samples(cfg, 2, seed=100 * step + pg.dp_rank), cfg))
            engine.backward(total_loss(out))
            engine.step()
            history.append((out.loss.item(), float(engine.get_global_grad_norm()), _routed_pairs(out, cfg)))
        runs[stage] = history
    experts = sorted(model.layers[1].ffn.experts.keys(), key=int)
    ep_ranks = torch.distributed.get_process_group_ranks(pg.ep_group) if pg.ep_group is not None else None
    return {"runs": runs, "reference": reference, "dp_rank": pg.dp_rank, "experts": experts,
            "ep_ranks": ep_ranks}


def _check_against_reference(results):
    for r in results:
        for stage, history in r["runs"].items():
            for step, ((loss, norm, _), (ref_losses, ref_norm, _)) in enumerate(zip(history, r["reference"])):
                assert ref_norm > 2 * CLIP  # clipping is active
                assert math.isclose(norm, ref_norm, rel_tol=1e-5), (stage, step, norm, ref_norm)
                ref_loss = ref_losses[r["dp_rank"]]
                assert math.isclose(loss, ref_loss, rel_tol=1e-5), (stage, step, loss, ref_loss)


def test_tp2_deepspeed_grad_norm_and_clipped_losses_equal_one_rank():
    """TP=2 (sequence parallel) on 2 processes under ZeRO 1 and 2: DeepSpeed's gradient norm and the
    losses of 3 clipped steps equal those of the whole model on one rank. Before the TP weights carried
    megatron-core's TP attribute, DeepSpeed counted only TP rank 0's shards in the norm."""
    results = run_distributed(_deepspeed_vs_reference, world_size=2, args=(2, 1, (1, 2)), timeout=240)
    _check_against_reference(results)
    _check_tokens_travel_once_per_tp_group(results)


def _check_tokens_travel_once_per_tp_group(results, tp=2):
    """At the first step, the (token, expert) pairs the TP ranks of a DP rank route (and send over EP) add up
    to those of the whole model on that DP rank's batch: each token is routed once per TP group, not once
    per TP rank."""
    for first in range(0, len(results), tp):
        group = results[first: first + tp]
        want = group[0]["reference"][0][2][group[0]["dp_rank"]]
        for stage in group[0]["runs"]:
            pairs = [r["runs"][stage][0][2] for r in group]
            assert sum(pairs) == want and min(pairs) > 0, (stage, pairs, want)


def test_tp2_ep2_deepspeed_grad_norm_and_clipped_losses_equal_one_rank():
    """TP=2 x EP=2 x DP=2 on 4 processes, ZeRO 1 and 2, against the whole model on one rank (the mean of
    both DP ranks' batches); the rank layout is DeepSpeed's (EP groups inside the DP groups)."""
    results = run_distributed(_deepspeed_vs_reference, world_size=4, args=(2, 2, (1, 2)), timeout=300)
    # TP groups [0,1], [2,3]; DP groups [0,2], [1,3]; DeepSpeed's EP groups split the DP groups
    assert [r["ep_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["experts"] for r in results] == [["0", "1"], ["0", "1"], ["2", "3"], ["2", "3"]]
    _check_against_reference(results)
    _check_tokens_travel_once_per_tp_group(results)
