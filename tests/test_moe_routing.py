"""Top-P routing semantics on hand-made probabilities/logits: threshold, bounds, ties, null, weights.

Run: .venv/bin/pytest tests/test_moe_routing.py
"""

import math

import pytest
import torch

from moe.config import MoEConfig
from moe.router import route, top_p_select


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
    raw = route(_logits([[0.5, 0.1, 0.1, 0.3]]), _cfg(combine_weights="raw"))
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
    (dict(combine_weights="softmax"), "combine_weights"), (dict(tie_eps=-0.1), "tie_eps"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**bad)


def released_code_multipliers(scores, k, eps):
    """The released code's sparsemixer (ignore_differentiable_router: its non-training path) for one token,
    transcribed loop for loop: {candidate: multiplier} of the k candidates it picks."""
    masked_scores, out = scores.clone(), {}
    for _ in range(k):
        threshold = masked_scores.max()
        factor = scores.abs().clamp(min=threshold.abs())
        masked_gates = masked_scores.masked_fill((threshold - scores) / factor > 2 * eps, float("-inf"))
        sel = int(masked_scores.argmax())
        out[sel] = torch.softmax(masked_gates, -1)[sel]
        masked_scores = masked_scores.clone()
        masked_scores[sel] = float("-inf")
    return out


def test_reference_weights_match_the_released_code():
    """Random logits, a quarter of the rows with near-ties (within the 2 * eps window or just outside)."""
    torch.manual_seed(0)
    cfg = _cfg(num_routed_experts=6, num_null_experts=2, top_p=0.8, combine_weights="reference")
    logits = torch.randn(64, 8) * 2
    logits[::4, 1] = logits[::4, 0] * (1 - torch.linspace(0.0, 0.05, 16))  # ties, near-ties, no ties
    logits[1::4, 3] = logits[1::4, 2] + 0.001
    r = route(logits, cfg)
    shared_window = 0
    for t in range(64):
        kept = torch.nonzero(r.selected[t]).flatten().tolist()
        m = released_code_multipliers(logits[t], len(kept), cfg.tie_eps)
        assert sorted(m) == kept
        expect = torch.zeros(8)
        for i, v in m.items():
            expect[i] = v / sum(m.values())
        torch.testing.assert_close(r.weights[t], expect)
        shared_window += any(v < 1 for v in m.values())
    assert shared_window >= 8  # the ties did land in the window


def _gate_grad(cfg, logits):
    """d(sum_i w_i c_i)/d logits for fixed random expert 'outputs' c."""
    logits = logits.clone().requires_grad_()
    r = route(logits, cfg)
    (r.weights * torch.arange(1.0, logits.shape[1] + 1)).sum().backward()
    return r, logits.grad


def test_what_each_combine_mode_does_to_the_gate_gradient():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])  # keeps 0 and 1 (0.59 + 0.22 >= 0.7), drops 2 and 3
    r, g = _gate_grad(_cfg(), logits)
    assert r.selected.tolist() == [[True, True, False, False]]
    assert g[0, :2].abs().min() > 0.1 and g[0, 2:].abs().max() < 1e-6  # kept logits only
    torch.testing.assert_close(g[0].sum(), torch.tensor(0.0))  # shift-invariant
    r, g = _gate_grad(_cfg(combine_weights="raw"), logits)
    assert g[0, 2:].abs().min() > 1e-3  # the dropped candidates' logits get gradient too
    assert r.weights.sum() < 1
    r, g = _gate_grad(_cfg(combine_weights="reference"), logits)
    torch.testing.assert_close(r.weights, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))  # 1/k, no ties
    assert g.abs().max() < 1e-6  # the routed outputs teach the gate nothing
    near = torch.tensor([[2.0, 1.99, 0.5, -1.0]])  # a near-tie: the multipliers depend on the logits
    r, g = _gate_grad(_cfg(combine_weights="reference"), near)
    assert r.weights[0, 0] < 0.5 and g[0, :2].abs().min() > 1e-3
