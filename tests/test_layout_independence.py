"""What must not depend on the layout: the initial weights (every parameter, routed experts by global id, at
EP 1/2/4 and TP 1/2), the router jitter of a token (keyed by seed, step, layer and global token position),
and the loss of a step (normalised per target token of the global batch, whatever the micro-batching)."""

import numpy as np
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from training.model import AudioLM, ModelConfig

MOE = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1, "top_p": 0.7}


def _cfg():
    return ModelConfig(num_layers=2, hidden_size=32, num_heads=4, num_codebooks=2, codebook_size=13,
                       delay_pattern="musicgen", text_vocab_size=30, vocab_pad_multiple=8, max_seq_len=64,
                       moe=MOE, moe_layers="all")


def _blocks(world: int, size: int) -> list[list[int]]:
    return [list(range(s, s + size)) for s in range(0, world, size)]


def _initial_states(rank, world_size):
    """Every rank builds the model from seed 0 at EP 1, 2, 4 and at TP 2 (x EP 2); returns its state dicts."""
    from megatron.core import parallel_state as ps

    from training.model.tensor_parallel import gather_full_state_dict, parallelize
    out = {}
    for ep in (1, 2, 4):
        groups = [dist.new_group(r) for r in _blocks(world_size, ep)]
        torch.manual_seed(0)
        model = AudioLM(_cfg(), ep_group=None if ep == 1 else groups[rank // ep])
        out[f"ep{ep}"] = model.state_dict()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    ep_groups = [dist.new_group(r) for r in ([0, 2], [1, 3])]  # the data-parallel ranks of each TP rank
    for ep in (1, 2):
        torch.manual_seed(0)
        model = AudioLM(_cfg(), ep_group=None if ep == 1 else ep_groups[rank % 2])
        parallelize(model, sequence_parallel=True)
        out[f"tp2_ep{ep}"] = gather_full_state_dict(model)
    ps.destroy_model_parallel()
    return out


def test_initial_state_dict_is_bit_identical_at_every_ep_and_tp():
    results = run_distributed(_initial_states, world_size=4, timeout=120)
    reference = results[0]["ep1"]
    assert len({k for k in reference if ".experts." in k}) == 2 * 4 * 3  # layers x experts x projections
    for layout in ("ep1", "ep2", "ep4", "tp2_ep1", "tp2_ep2"):
        merged = {}
        for r in range(4):
            merged.update(results[r][layout])  # experts carry global ids: the union is the whole model
        assert merged.keys() == reference.keys(), layout
        for name, t in reference.items():
            assert torch.equal(merged[name], t), f"{layout}: {name} differs from EP 1"
    # and the routed experts of a layer are distinct (not copies drawn by each EP rank)
    w = [reference[f"layers.0.ffn.experts.{g}.gate_proj.weight"] for g in range(4)]
    assert all(not torch.equal(w[0], w[g]) for g in range(1, 4))


def test_router_jitter_is_a_function_of_the_token_not_of_the_rank_stream():
    from moe.layer import MoELayer, set_jitter_seed
    from training.data import token_keys
    torch.manual_seed(0)
    cfg = _cfg().moe_config()
    layer = MoELayer(cfg).train()
    wrapper = torch.nn.ModuleList([layer])
    set_jitter_seed(wrapper, seed=3, step=7)
    x = torch.randn(6, 5, cfg.hidden_size)
    keys = token_keys([10, 11, 12, 13, 14, 15], 5)
    full, _ = layer(x, token_keys=keys)
    torch.manual_seed(123)  # another rank's stream: no effect on the noise
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    for part in order.split(3):  # other micro-batches, other order
        got, _ = layer(x[part], token_keys=keys[part])
        torch.testing.assert_close(got, full[part], rtol=0, atol=0)
    set_jitter_seed(wrapper, seed=3, step=8)  # the next step draws new noise
    other, _ = layer(x, token_keys=keys)
    assert not torch.equal(other, full)
    layer.eval()  # no noise in evaluation
    assert torch.equal(layer(x, token_keys=keys)[0], layer(x)[0])


def _samples(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": f"s{i}", "task": ("speech", "music")[i % 3 == 0],
             "text_ids": rng.integers(5, cfg.text_vocab_size, size=2 + i % 3),
             "codes": rng.integers(0, cfg.codebook_size, size=(cfg.num_codebooks, 3 + 2 * i))}
            for i in range(n)]


def test_step_loss_is_per_token_of_the_global_batch_whatever_the_micro_batches():
    from types import SimpleNamespace

    from training.model.batch import collate
    from training.model.lm import TASKS
    from training.token_loss import StepTokens
    cfg = _cfg()
    torch.manual_seed(0)
    model = AudioLM(ModelConfig(**{**cfg.__dict__, "moe": None, "moe_layers": "none"}))
    samples = _samples(cfg, 6)

    def step_loss(split):  # micro-batches of `split` samples: the step's loss and per-task losses
        batches = [collate(samples[i: i + split], cfg) for i in range(0, len(samples), split)]
        tokens = StepTokens.of(batches, SimpleNamespace(dp=1, dp_group=None), "sum", "cpu")
        assert tokens.scale == len(batches)
        return sum(tokens.contributions(model(b), b["task"]) for b in batches)

    whole = collate(samples, cfg)
    out = model(whole)
    valid = (whole["labels"] != -100).float()
    expected = [(out.token_loss_sum.sum(0) / valid.sum((0, 2))).sum()]  # per codebook over all targets
    for t in range(len(TASKS)):
        sel = whole["task"] == t
        expected.append((out.token_loss_sum[sel].sum(0) / valid[sel].sum((0, 2))).sum())
    for split in (1, 2, 3, 6):
        torch.testing.assert_close(step_loss(split), torch.stack(expected), rtol=1e-6, atol=0)
