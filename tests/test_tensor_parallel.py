"""Tensor parallelism (megatron-core layers on gloo): TP=2 equals TP=1 for logits, loss and gradients;
shard/merge of state dicts round-trips; TP=2 x EP=2 trains under deepspeed.initialize."""

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from training.model import AudioLM, ModelConfig
from training.model.tensor_parallel import check_tp_size, merge_state_dicts, shard_kind, shard_state_dict

MOE = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1, "top_p": 0.7,
       "input_jitter": 0.0}


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


def _tp_vs_full(rank, world_size, cfg):
    from megatron.core import parallel_state as ps

    from training.model.batch import collate
    from training.model.tensor_parallel import (
        gather_full_state_dict,
        gather_vocab,
        merge_tensors,
        parallelize,
    )

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    torch.manual_seed(0)
    ref = AudioLM(cfg)
    tp_model = AudioLM(cfg)
    tp_model.load_state_dict(ref.state_dict())
    parallelize(tp_model)
    batch = collate(make_samples(cfg, 3, seed=1), cfg)
    out_ref = ref(batch)
    out_ref.loss.backward()
    out = tp_model(batch)
    out.loss.backward()
    grads = {}
    for name, p in tp_model.named_parameters():
        kind = shard_kind(name)
        g = p.grad
        if kind is not None:
            parts = [torch.empty_like(g) for _ in range(world_size)]
            torch.distributed.all_gather(parts, g.contiguous(), group=ps.get_tensor_model_parallel_group())
            g = merge_tensors(parts, kind, cfg)
        grads[name] = (g - dict(ref.named_parameters())[name].grad).abs().max().item()
    logits = gather_vocab(out.logits)
    full = gather_full_state_dict(tp_model)
    same_state = all(torch.equal(full[k], v) for k, v in ref.state_dict().items()) and full.keys() == \
        ref.state_dict().keys()
    ps.destroy_model_parallel()
    return {"logits": (logits - out_ref.logits).abs().max().item(),
            "loss": (out.loss - out_ref.loss).abs().item(),
            "tasks": max((out.loss_per_task[t] - out_ref.loss_per_task[t]).abs().item()
                         for t in out_ref.loss_per_task),
            "grads": grads, "local_vocab": out.logits.shape[-1], "same_state": same_state}


def _tp_checks(rank, world_size, cfgs, jitter_cfg):
    return [_tp_vs_full(rank, world_size, cfg) for cfg in cfgs], _tp_jitter(rank, world_size, jitter_cfg)


def test_tp2_equals_tp1_dense_and_moe():
    """TP=2 == TP=1 for both variants; with router jitter on, the replicated MoE layer routes identically
    on every TP rank. One pair of gloo processes runs all checks (process start-up dominates)."""
    cfgs = {"dense": tiny_cfg(), "moe": tiny_cfg(moe=MOE)}
    jitter_cfg = tiny_cfg(moe={**MOE, "input_jitter": 0.5})
    results = run_distributed(_tp_checks, world_size=2, args=(list(cfgs.values()), jitter_cfg))
    a, b = results[0][1], results[1][1]
    assert torch.equal(a["selected"], b["selected"]) and torch.equal(a["loss"], b["loss"])
    for rank_results, _ in results:
        for (variant, cfg), r in zip(cfgs.items(), rank_results):
            assert r["local_vocab"] == cfg.padded_audio_vocab_size // 2
            assert r["same_state"], variant  # gathered shards == the full weights
            assert r["logits"] < 1e-5 and r["loss"] < 1e-5 and r["tasks"] < 1e-5, (variant, r)
            bad = {k: v for k, v in r["grads"].items() if v > 1e-5}
            assert not bad, (variant, bad)


def _tp_jitter(rank, world_size, cfg):
    from megatron.core import parallel_state as ps

    from training.model.batch import collate
    from training.model.tensor_parallel import parallelize

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    torch.manual_seed(0)
    model = parallelize(AudioLM(cfg)).train()
    torch.manual_seed(1000 + rank)  # per-rank seeds, as trainers often set them
    out = model(collate(make_samples(cfg, 3, seed=1), cfg))
    ps.destroy_model_parallel()
    return {"selected": out.aux[0].selected, "loss": out.loss.detach()}


def _tp_ep_train(rank, world_size, steps):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from training.cluster.parallel import init_parallel
    from training.config import ParallelConfig
    from training.model.batch import collate
    from training.model.tensor_parallel import parallelize
    from training.model.upcycle import upcycle

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group run_distributed started
    pg = init_parallel(ParallelConfig(tp=2, ep=2, backend="gloo"))
    ep_ranks = torch.distributed.get_process_group_ranks(pg.ep_group)
    dense = tiny_cfg(ffn_hidden_size=64)
    cfg = tiny_cfg(ffn_hidden_size=64, moe={**MOE, "routed_ffn_size": 32, "shared_ffn_size": 16})
    torch.manual_seed(0)
    specialists = [AudioLM(dense) for _ in range(2)]
    model = upcycle(specialists, cfg, ep_group=pg.ep_group)  # this rank's 2 of the 4 experts
    parallelize(model)
    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"params": list(model.parameters()), "name": "params"}])
    opt = torch.optim.AdamW(groups, lr=3e-3)
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=pg.mpu)
    batch = collate(make_samples(cfg, 4, seed=10 + pg.dp_rank), cfg)  # same batch within a TP group
    losses = []
    for _ in range(steps):
        out = engine(batch)
        engine.backward(out.loss + 0.01 * sum(a.balance_loss for a in out.aux))
        engine.step()
        losses.append(out.loss.item())
    experts = sorted(model.layers[1].ffn.experts.keys(), key=int)
    norm = model.layers[0].attn_norm.weight.detach().clone()
    return {"losses": losses, "ep_ranks": ep_ranks, "tp_rank": pg.tp_rank, "dp_rank": pg.dp_rank,
            "experts": experts, "norm": norm,
            "expert0": model.layers[1].ffn.experts[experts[0]].gate_proj.weight.detach().clone()}


def test_tp2_ep2_deepspeed_training():
    res = run_distributed(_tp_ep_train, world_size=4, args=(6,), timeout=240)
    print("\nTP=2 x EP=2 losses per rank:", [[round(x, 3) for x in r["losses"]] for r in res])
    # TP groups [0,1], [2,3]; DP groups [0,2], [1,3]; DeepSpeed's EP groups split the DP groups
    assert [r["ep_ranks"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["experts"] for r in res] == [["0", "1"], ["0", "1"], ["2", "3"], ["2", "3"]]
    for r in res:
        assert r["losses"][-1] < r["losses"][0] - 0.5, r["losses"]
    # replicated parameters stay identical across the TP group (and the DP group), experts across TP
    assert torch.equal(res[0]["norm"], res[1]["norm"]) and torch.allclose(res[0]["norm"], res[2]["norm"])
    assert torch.equal(res[0]["expert0"], res[1]["expert0"])
    assert torch.equal(res[2]["expert0"], res[3]["expert0"])
    assert res[0]["losses"] == res[1]["losses"]
