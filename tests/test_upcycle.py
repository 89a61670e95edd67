"""Upcycling dense specialists into the MoE model: expert weights are the specialists' FFN slices (our 2 x 4
and the paper's 4 x 2 layouts), the numbers must fit, and the per-task loss right after upcycling is
compared with the specialists'."""

import numpy as np
import pytest
import torch

from training.model import AudioLM, ModelConfig
from training.model.batch import collate
from training.model.upcycle import experts_per_specialist, upcycle, upcycle_state_dict

BASE = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, num_codebooks=2, codebook_size=16,
            delay_pattern="musicgen", text_vocab_size=32, vocab_pad_multiple=8, max_seq_len=96)


def moe_cfg(n_routed=4, width=32, **kw):
    moe = {"num_routed_experts": n_routed, "num_null_experts": 1, "num_shared_experts": 1,
           "routed_ffn_size": width, "shared_ffn_size": 16, "top_p": 0.7, "input_jitter": 0.0, **kw}
    return ModelConfig(**BASE, moe=moe, moe_layers="all")


def _specialists(n):
    out = []
    for s in range(n):
        torch.manual_seed(100 + s)
        out.append(AudioLM(ModelConfig(**BASE)))
    return out


@pytest.mark.parametrize("n_spec, per_spec", [(2, 4), (4, 2)])  # ours, the paper's (released width F / 4)
def test_experts_are_specialist_slices(n_spec, per_spec):
    specs = _specialists(n_spec)
    width = BASE["ffn_hidden_size"] // 4
    cfg = moe_cfg(n_routed=n_spec * per_spec, width=width)
    model = upcycle(specs, cfg)
    assert experts_per_specialist(cfg, n_spec) == per_spec
    for layer in range(cfg.num_layers):
        ffn = model.layers[layer].ffn
        for s, spec in enumerate(specs):
            dense = spec.layers[layer].ffn
            for j in range(per_spec):  # expert s * P + j = quarter j of specialist s
                e = ffn.experts[str(s * per_spec + j)]
                rows = slice(j * width, (j + 1) * width)
                assert torch.equal(e.gate_proj.weight, dense.gate_proj.weight[rows])
                assert torch.equal(e.up_proj.weight, dense.up_proj.weight[rows])
                assert torch.equal(e.down_proj.weight, dense.down_proj.weight[:, rows])
            if per_spec * width == BASE["ffn_hidden_size"]:  # all quarters: together the dense FFN
                x = torch.randn(5, cfg.hidden_size)
                total = sum(ffn.experts[str(s * per_spec + j)](x) for j in range(per_spec))
                torch.testing.assert_close(total, dense(x), atol=1e-5, rtol=1e-5)
    avg = sum(spec.layers[0].attn.qkv_proj.weight for spec in specs) / n_spec
    torch.testing.assert_close(model.layers[0].attn.qkv_proj.weight, avg)
    # fresh gate/shared: deterministic from the seed
    again = upcycle_state_dict(specs, cfg, seed=0)
    assert torch.equal(again["layers.0.ffn.gate.weight"], model.layers[0].ffn.gate.weight)


def test_three_specialists_and_errors():
    specs = _specialists(3)
    assert experts_per_specialist(moe_cfg(n_routed=6), 3) == 2
    upcycle(specs, moe_cfg(n_routed=6))
    with pytest.raises(ValueError, match="num_routed_experts=4 must be a multiple of the number of spec"):
        upcycle(specs, moe_cfg(n_routed=4))
    with pytest.raises(ValueError, match="routed_ffn_size=24 must divide"):
        upcycle(specs, moe_cfg(n_routed=6, width=24))
    with pytest.raises(ValueError, match="no MoE layers"):
        upcycle(specs, ModelConfig(**BASE))


def _task_samples(task, n, rng):
    """Learnable toy tasks: speech codes copy the text, music codes count up from a caption-given start."""
    out = []
    for i in range(n):
        text = rng.integers(5, 21, size=4)
        T = 8
        if task == "speech":
            codes = np.stack([(np.resize(text, T) + k) % 16 for k in range(2)])
        else:
            codes = np.stack([(text[0] + 3 * np.arange(T) + k) % 16 for k in range(2)])
        out.append({"id": f"{task}{i}", "task": task, "text_ids": text, "codes": codes})
    return out


def _train(model, batches, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = model(batches[step % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("init", ["common", "separate"])
def test_upcycled_loss_vs_specialists(init):
    """Specialists trained briefly on two toy tasks, from one common init (the paper: all fine-tuned from
    the same backbone) or from different random inits; then upcycled and evaluated per task."""
    rng = np.random.default_rng(0)
    cfg_d = ModelConfig(**BASE)
    data = {t: [collate(_task_samples(t, 8, rng), cfg_d) for _ in range(4)] for t in ("speech", "music")}
    valid = {t: collate(_task_samples(t, 16, rng), cfg_d) for t in ("speech", "music")}
    specs = []
    for s, task in enumerate(("speech", "music")):
        torch.manual_seed(0 if init == "common" else s)
        m = AudioLM(cfg_d)
        _train(m, data[task], 60)
        specs.append(m.eval())
    cfg = moe_cfg()
    torch.manual_seed(0)
    fresh = AudioLM(cfg).eval()
    up = upcycle(specs, cfg).eval()
    with torch.no_grad():
        res = {t: {"specialist": specs[i](valid[t]).loss.item(), "upcycled": up(valid[t]).loss.item(),
                   "other_specialist": specs[1 - i](valid[t]).loss.item(),
                   "random_moe": fresh(valid[t]).loss.item()}
               for i, t in enumerate(("speech", "music"))}
    print(f"\n{init} init, per-task LM loss (sum over 2 codebooks):",
          {t: {k: round(v, 3) for k, v in r.items()} for t, r in res.items()})
    for t in res:
        assert res[t]["specialist"] < res[t]["upcycled"] < res[t]["random_moe"]
