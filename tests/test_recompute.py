"""Activation recomputation (model.recompute = block | moe, torch.utils.checkpoint non-reentrant) gives the
same losses, router losses and gradients as none, with expert parallelism (EP=2 on gloo, fp32) and router
jitter on; the recomputation runs the MoE layer's token exchange again in backward, on every rank alike."""

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from training.model import ModelConfig

MODES = ("none", "block", "moe")


def _cfg(recompute):
    moe = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1, "z_loss_weight": 0.1}
    return ModelConfig(num_layers=3, hidden_size=32, num_heads=4, num_codebooks=2, codebook_size=13,
                       delay_pattern="musicgen", text_vocab_size=30, vocab_pad_multiple=8,
                       recompute=recompute, moe=moe, moe_layers=[1, 2])


def _run(rank, world_size):
    import torch.distributed as dist

    import moe.dispatch
    from training.model import AudioLM
    from training.model.batch import collate

    group = dist.new_group(list(range(world_size)))
    rng = np.random.default_rng(rank)
    samples = [{"id": str(i), "task": ("speech", "music")[i % 2], "text_ids": rng.integers(5, 20, size=3),
                "codes": rng.integers(0, 13, size=(2, 6 + i))} for i in range(3)]
    batch = collate(samples, _cfg("none"))
    calls = {"n": 0}
    raw = moe.dispatch._exchange

    def counted(*args):
        calls["n"] += 1
        return raw(*args)

    moe.dispatch._exchange = counted
    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = AudioLM(_cfg(mode), ep_group=group).train()
        torch.manual_seed(1 + rank)  # router jitter draws: recomputation must replay them
        res = model(batch)
        loss = res.loss + sum(0.01 * a.balance_loss + 0.1 * a.z_loss + 0.1 * a.entropy_loss for a in res.aux)
        fwd = calls["n"]
        loss.backward()
        out[mode] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                     "exchanges": (fwd, calls["n"] - fwd)}
        calls["n"] = 0
    return out


@pytest.mark.parametrize("world_size", [2], ids=["ep2"])
def test_recompute_block_and_moe_equal_none(world_size):
    results = run_distributed(_run, world_size=world_size)
    for out in results:
        ref = out["none"]
        for mode in MODES[1:]:
            torch.testing.assert_close(out[mode]["loss"], ref["loss"], rtol=0, atol=0)
            for name, g in ref["grads"].items():
                torch.testing.assert_close(out[mode]["grads"][name], g, rtol=1e-6, atol=1e-7, msg=name)
            # the forward exchanges are the same; backward runs them again inside the recomputation
            assert out[mode]["exchanges"][0] == ref["exchanges"][0]
            assert out[mode]["exchanges"][1] > ref["exchanges"][1], (mode, out[mode]["exchanges"])
    print("\nexchanges (forward, backward) per mode:", {m: results[0][m]["exchanges"] for m in MODES})
