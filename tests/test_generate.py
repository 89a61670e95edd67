"""Generation: incremental decoding with the KV cache equals a full forward pass (also with left
padding); sampling filters; generate() respects min/max length, EOS and the delay layout, with CFG."""

import pytest
import torch

from training.model import AudioLM, KVCache, ModelConfig
from training.model.batch import collate
from training.model.generate import _left_pad, generate, sample_logits


def tiny_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, num_codebooks=3, codebook_size=16,
                delay_pattern=[0, 2, 3], text_vocab_size=40, vocab_pad_multiple=8, max_seq_len=128)
    return ModelConfig(**{**base, **kw})


def _model(cfg):
    torch.manual_seed(0)
    return AudioLM(cfg).eval()


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_kv_cache_matches_full_forward(variant):
    moe = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1}
    cfg = tiny_cfg(moe=moe if variant == "moe" else None)
    model = _model(cfg)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 6), generator=g)
    sample = {"id": "a", "task": "music", "text_ids": [7, 8, 9], "codes": codes}
    b = collate([sample], cfg)
    L = int(b["valid"].sum())
    text, audio, amask = b["text"][:, :L], b["audio"][:, :, :L], b["audio_mask"][:, :L]
    with torch.no_grad():
        full, _ = model.forward_logits(text, audio, amask)
        cache = KVCache(cfg.num_layers)
        split = 7
        parts = [model.forward_logits(text[:, :split], audio[:, :, :split], amask[:, :split], cache=cache)[0]]
        for i in range(split, L):
            parts.append(model.forward_logits(text[:, i:i + 1], audio[:, :, i:i + 1], amask[:, i:i + 1],
                                              cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_valid", [False, True])
def test_multi_token_chunks_on_a_nonempty_cache_match_full_forward(with_valid):
    """Chunks of 5, 4, 1 and the remaining positions appended to the cache (chunked prefill): each chunk's
    queries see every cached key plus the causal part of their own chunk."""
    cfg = tiny_cfg(moe={"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1})
    model = _model(cfg)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 9), generator=g)
    b = collate([{"id": "a", "task": "speech", "text_ids": [7, 8, 9], "codes": codes}], cfg)
    L = int(b["valid"].sum())
    text, audio, amask = b["text"][:, :L], b["audio"][:, :, :L], b["audio_mask"][:, :L]
    with torch.no_grad():
        full, _ = model.forward_logits(text, audio, amask)
        cache, parts, start = KVCache(cfg.num_layers), [], 0
        for size in (5, 4, 1, L - 10):
            end = start + size
            valid = torch.ones(1, end, dtype=torch.bool) if with_valid else None
            parts.append(model.forward_logits(text[:, start:end], audio[:, :, start:end], amask[:, start:end],
                                              valid=valid, cache=cache)[0])
            start = end
    assert start == L
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_prompt_matches_unpadded():
    cfg = tiny_cfg()
    model = _model(cfg)
    prompts = [[2, 9, 10, 11, 12, 4], [3, 4]]
    text, valid = _left_pad(prompts)
    B, P = text.shape
    audio = torch.full((B, cfg.num_codebooks, P), cfg.delays().pad)
    amask = torch.zeros(B, P, dtype=torch.bool)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded, _ = model.forward_logits(text, audio, amask, positions=pos, valid=valid)
        alone, _ = model.forward_logits(text[1:, -2:], audio[1:, :, -2:], amask[1:, -2:])
    torch.testing.assert_close(padded[1, -2:], alone[0], atol=1e-5, rtol=1e-5)


def test_sample_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9]]).repeat(200, 1)
    assert set(sample_logits(logits, top_k=2, generator=g).tolist()) <= {2, 3}
    assert set(sample_logits(logits, top_p=0.3, generator=g).tolist()) == {2}
    assert sample_logits(logits, temperature=0).eq(2).all()


@pytest.mark.parametrize("cfg_scale", [0.0, 3.0])
def test_generate_lengths_and_layout(cfg_scale):
    cfg = tiny_cfg()
    model = _model(cfg)
    g = torch.Generator().manual_seed(0)
    codes, lengths = generate(model, ["speech", "music"], [[5, 6, 7], [8]], min_frames=3, max_frames=5,
                              cfg_scale=cfg_scale, generator=g, return_lengths=True)
    assert codes.shape[:2] == (2, cfg.num_codebooks)
    assert ((lengths >= 3) & (lengths <= 5)).all() and codes.shape[2] == int(lengths.max())
    assert codes.min() >= 0 and codes.max() < cfg.codebook_size
    assert model.training is False


def test_generate_exact_length_is_deterministic():
    cfg = tiny_cfg()
    model = _model(cfg)
    a, b = (generate(model, "music", [[5, 6]], min_frames=4, max_frames=4,
                     generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.shape == (1, cfg.num_codebooks, 4) and torch.equal(a, b)


def test_generate_too_long():
    cfg = tiny_cfg(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(_model(cfg), "speech", [[5]], max_frames=50)


def test_greedy_generation_agrees_with_full_forward():
    """Greedy codes from the cached loop equal the argmax of one full forward over the result."""
    cfg = tiny_cfg()
    model = _model(cfg)
    codes = generate(model, "speech", [[5, 6, 7]], min_frames=5, max_frames=5, temperature=0, cfg_scale=0.0)
    b = collate([{"id": "g", "task": "speech", "text_ids": [5, 6, 7], "codes": codes[0]}], cfg)
    with torch.no_grad():
        logits = model(b).logits[..., : cfg.codebook_size]
    content = (b["labels"] >= 0) & (b["labels"] < cfg.codebook_size)  # [B, K, L]
    pred = logits.argmax(-1).permute(0, 2, 1)  # [B, K, L]
    assert content.sum() == 5 * cfg.num_codebooks
    assert torch.equal(pred[content], b["labels"][content])
