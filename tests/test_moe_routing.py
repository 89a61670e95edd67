"""Top-P routing semantics on hand-made probabilities/logits: threshold, bounds, ties, null, weights.

Run: .venv/bin/pytest tests/test_moe_routing.py
"""

import math

import pytest
import torch

from moe.config import MoEConfig
from moe.router import gate_logits, jitter_noise, route, top_p_select


def _cfg(**kw):
    base = dict(hidden_size=8, routed_ffn_size=4, shared_ffn_size=4, num_routed_experts=3,
                num_null_experts=1, num_shared_experts=0)
    base.update(kw)
    return MoEConfig(**base)


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_smallest_prefix_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05], [0.5, 0.25, 0.25]])
    sel = top_p_select(probs, 0.7)
    assert sel.tolist() == [[True, True, False], [False, True, True], [True, False, False],
                            [True, True, False]]
    # reaching the threshold exactly counts (0.5 + 0.25 == 0.75)
    assert top_p_select(probs[3:], 0.75).tolist() == [[True, True, False]]
    assert top_p_select(probs[3:], 1.0).tolist() == [[True, True, True]]


def test_min_k_max_k_and_fixed_k():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
    assert top_p_select(probs, 0.7, min_k=2).sum(-1).tolist() == [2, 3]
    assert top_p_select(probs, 0.7, max_k=2).sum(-1).tolist() == [1, 2]
    fixed = top_p_select(probs, 0.7, min_k=2, max_k=2)
    assert fixed.sum(-1).tolist() == [2, 2]
    assert fixed[0].tolist() == [True, True, False, False]


def test_ties_go_to_the_lower_index():
    probs = torch.full((1, 4), 0.25)
    assert top_p_select(probs, 0.5).tolist() == [[True, True, False, False]]
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3]])
    assert top_p_select(probs, 0.5).tolist() == [[False, True, True, False]]


def test_renormalised_weights_include_null():
    cfg = _cfg()
    # candidates: 3 routed + 1 null; token 0 keeps routed 0 and null (0.5 + 0.3 >= 0.7)
    r = route(_logits([[0.5, 0.1, 0.1, 0.3]]), cfg)
    assert r.selected.tolist() == [[True, False, False, True]]
    assert torch.allclose(r.weights, torch.tensor([[0.625, 0.0, 0.0, 0.375]]))
    raw = route(_logits([[0.5, 0.1, 0.1, 0.3]]), _cfg(renormalize=False))
    assert torch.allclose(raw.weights, torch.tensor([[0.5, 0.0, 0.0, 0.3]]))


def test_all_null_token():
    r = route(_logits([[0.05, 0.05, 0.05, 0.85]]), _cfg())
    assert r.selected.tolist() == [[False, False, False, True]]
    assert r.weights[0, :3].abs().sum() == 0


def test_gated_shared_experts_follow_the_reference_rule():
    cfg = _cfg(num_shared_experts=2)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, 1.0, -0.5]])
    r = route(logits, cfg)
    sel = r.selected[0]
    dyn = torch.softmax(logits[0, :4], -1)
    kept = dyn * sel
    joint_logits = torch.cat([logits[0, :4].masked_fill(~sel, -math.inf), logits[0, 4:]])
    joint = torch.softmax(joint_logits, -1)
    expect = kept / kept.sum() * joint[:4].sum()
    assert torch.allclose(r.weights[0], expect)
    assert torch.allclose(r.shared_weights[0], joint[4:])
    assert torch.allclose(r.weights.sum() + r.shared_weights.sum(), torch.tensor(1.0))
    ungated = route(logits, _cfg(num_shared_experts=2, gate_shared=False))
    assert ungated.shared_weights is None
    assert torch.allclose(ungated.weights.sum(), torch.tensor(1.0))


def test_random_batch_matches_per_token_rule():
    torch.manual_seed(0)
    cfg = _cfg(num_routed_experts=8, num_null_experts=2, min_k=2, max_k=6)
    probs = torch.softmax(torch.randn(200, 10) * 2, -1)
    sel = top_p_select(probs, cfg.top_p, cfg.min_k, cfg.max_k)
    for p, s in zip(probs, sel):
        order = sorted(range(10), key=lambda i: (-p[i].item(), i))
        k, acc = 0, 0.0
        while acc < cfg.top_p and k < 10:
            acc += p[order[k]].item()
            k += 1
        k = min(max(k, cfg.min_k), cfg.max_k)
        assert set(torch.nonzero(s).flatten().tolist()) == set(order[:k])


@pytest.mark.parametrize("bad, match", [
    (dict(top_p=0.0), "top_p"), (dict(min_k=0), "min_k"), (dict(min_k=3, max_k=2), "max_k"),
    (dict(max_k=9), "max_k"), (dict(num_routed_experts=0), "num_routed_experts"),
    (dict(ep_exchange="mpi"), "ep_exchange"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**bad)


def test_jitter_noise_is_uniform_on_its_interval():
    noise = jitter_noise(torch.ones(1000, 64), 0.01)
    assert noise.dtype == torch.float32 and noise.shape == (1000, 64)
    assert noise.min() >= 0.99 and noise.max() <= 1.01
    # U(-1, 1) after rescaling, in each of the four 16-bit lanes that one 64-bit draw gives
    lanes = ((noise.double() - 1.0) / 0.01).reshape(-1, 4)
    assert lanes.mean(0).abs().max() < 0.03  # std of a lane mean: 0.577 / sqrt(16000) = 0.0046
    assert (lanes.std(0) - 1 / math.sqrt(3)).abs().max() < 0.01
    assert len(torch.unique(noise)) > 30000  # 16-bit resolution, not a handful of levels


def test_jittered_gate_matches_autograd_with_the_same_noise():
    x, w, g = torch.randn(37, 24), torch.randn(11, 24), torch.randn(37, 11)
    torch.manual_seed(3)
    noise = jitter_noise(x, 0.2)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = (x_ref * noise) @ w_ref.t()
    (ref * g).sum().backward()
    torch.manual_seed(3)  # the same draw inside gate_logits
    x_ours, w_ours = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = gate_logits(x_ours, w_ours, 0.2)
    (ours * g).sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(w_ours.grad, w_ref.grad)
    torch.testing.assert_close(gate_logits(x, w), x @ w.t())
