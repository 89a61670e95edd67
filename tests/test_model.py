"""AudioLM (dense) and collate: batch layout, loss masking, causality, config errors, parameter counts."""

import numpy as np
import pytest
import torch

from training.model import IGNORE_INDEX, AudioLM, ModelConfig
from training.model.batch import SEP_ID, TASK_TOKEN_IDS, collate
from training.model.params import parameter_counts


def tiny_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_heads=4, num_codebooks=3, codebook_size=16,
                delay_pattern="musicgen", text_vocab_size=40, vocab_pad_multiple=8, max_seq_len=128)
    return ModelConfig(**{**base, **kw})


def samples(cfg, n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(1, 7))
        out.append({"id": f"s{i}", "task": ("speech", "music")[i % 2],
                    "text_ids": rng.integers(5, cfg.text_vocab_size, size=int(rng.integers(1, 5))),
                    "codes": rng.integers(0, cfg.codebook_size, size=(cfg.num_codebooks, T))})
    return out


def test_collate_layout():
    cfg = tiny_cfg()
    ss = samples(cfg)
    b = collate(ss, cfg)
    pat = cfg.delays()
    for i, s in enumerate(ss):
        P = len(s["text_ids"]) + 2
        T = s["codes"].shape[1]
        S = pat.delayed_length(T)
        assert b["text"][i, 0] == TASK_TOKEN_IDS[s["task"]] and b["text"][i, P - 1] == SEP_ID
        assert b["audio_mask"][i].sum() == S - 1 and b["audio_mask"][i, P]
        assert (b["audio"][i, :, P] == pat.bos).all()
        assert b["valid"][i].sum() == P + S - 1
        assert (b["task_ids"][i][~b["valid"][i]] == -1).all()
        # targets: the codes shifted by the delays, then EOS; BOS/PAD never targets
        lab = b["labels"][i]
        for k, d in enumerate(pat.delays):
            row = lab[k][lab[k] != IGNORE_INDEX]
            assert row.tolist() == list(s["codes"][k]) + [pat.eos]
            assert lab[k, P + d] == s["codes"][k][0]


def test_cond_drop():
    cfg = tiny_cfg()
    b = collate(samples(cfg, 4), cfg, cond_drop_prob=1.0)
    assert b["cond_dropped"].all()
    assert (b["text"][:, 1] == SEP_ID).all()
    b = collate(samples(cfg, 4), cfg, cond_drop_prob=0.0)
    assert not b["cond_dropped"].any()


def test_collate_errors():
    cfg = tiny_cfg()
    s = samples(cfg, 1)[0]
    with pytest.raises(ValueError, match="codes must be"):
        collate([{**s, "codes": s["codes"][:2]}], cfg)
    with pytest.raises(ValueError, match="text_vocab_size"):
        collate([{**s, "text_ids": np.array([99])}], cfg)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny_cfg(num_heads=5)
    with pytest.raises(ValueError, match="moe_layers"):
        tiny_cfg(moe={}, moe_layers=[7])
    with pytest.raises(ValueError, match="ModelConfig.moe: .*num_experts"):
        tiny_cfg(moe={"num_experts": 4})
    with pytest.raises(ValueError, match="MoEConfig: top_p"):
        tiny_cfg(moe={"top_p": 1.5})
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_cfg(num_kv_heads=3)
    with pytest.raises(ValueError, match="delay pattern"):
        tiny_cfg(delay_pattern=[0, 1])


def test_loss_and_backward():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = AudioLM(cfg)
    b = collate(samples(cfg, 4), cfg)
    out = model(b)
    K, V = cfg.num_codebooks, cfg.padded_audio_vocab_size
    assert out.logits.shape == (4, b["text"].shape[1], K, V)
    assert out.loss_per_codebook.shape == (K,)
    assert set(out.loss_per_task) == {"speech", "music"}
    # random init: each codebook's loss is about log(V)
    assert torch.allclose(out.loss_per_codebook, torch.full((K,), np.log(V)), atol=0.5)
    torch.testing.assert_close(out.loss, out.loss_per_codebook.sum())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("text_embed"))
    mean_model = AudioLM(tiny_cfg(codebook_loss="mean"))
    mean_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(mean_model(b).loss, out.loss / K)


def test_causal_and_padding_invariant():
    """Changing a later position leaves earlier logits unchanged; batch padding changes nothing."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = AudioLM(cfg).eval()
    ss = samples(cfg, 3)
    b = collate(ss, cfg)
    alone = collate(ss[:1], cfg)
    L0 = alone["text"].shape[1]
    torch.testing.assert_close(model(b).logits[0, :L0], model(alone).logits[0], atol=1e-5, rtol=1e-5)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["audio"][:, :, -1] = 0
    torch.testing.assert_close(model(b).logits[:, :-1], model(b2).logits[:, :-1])


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_parameter_counts_match_model(kv_heads):
    cfg = tiny_cfg(num_kv_heads=kv_heads)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in AudioLM(cfg).parameters())
    assert counts["active_min"] == counts["active_max"] == counts["total"]


def test_gqa_runs():
    cfg = tiny_cfg(num_kv_heads=1)
    out = AudioLM(cfg)(collate(samples(cfg), cfg))
    assert torch.isfinite(out.loss)


def test_moe_variant_counts_and_aux():
    moe = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 2, "top_p": 0.7}
    cfg = tiny_cfg(moe=moe, moe_layers="every_other")
    model = AudioLM(cfg)
    assert [b.is_moe for b in model.layers] == [False, True]
    b = collate(samples(cfg, 4), cfg)
    out = model(b)
    assert len(out.aux) == 1 and torch.isfinite(out.aux[0].balance_loss)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # ceil(0.7 * 5) = 4 candidates at most; one null expert can take the only slot -> 0 routed at least
    assert (counts["routed_per_token_min"], counts["routed_per_token_max"]) == (0, 4)
    assert counts["active_min"] < counts["active_mean"] < counts["active_max"] == counts["total"]


def test_train_flops_per_token():
    from training.model.params import train_flops_per_token
    cfg = tiny_cfg()
    c = parameter_counts(cfg)
    assert train_flops_per_token(cfg, 10) == 6 * (c["total"] - c["embedding"]) + 12 * 2 * 32 * 10
