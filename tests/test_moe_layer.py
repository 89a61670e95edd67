"""MoELayer (EP=1) against a slow per-token reference: outputs and all gradients; null, losses, stats.

Run: .venv/bin/pytest tests/test_moe_layer.py
"""

import pytest
import torch
import torch.nn.functional as F

from moe.config import MoEConfig
from moe.layer import MoELayer
from moe.losses import balance_weight, combine_aux
from tests.test_moe_routing import released_code_multipliers


def _swiglu(x, ex):
    return F.linear(F.silu(F.linear(x, ex.gate_proj.weight)) * F.linear(x, ex.up_proj.weight),
                    ex.down_proj.weight)


def reference_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the paper's equations and the reference code's shared gating."""
    cfg = layer.cfg
    n_dyn = cfg.num_dynamic_experts
    outs = []
    for t in range(x.shape[0]):
        xt = x[t]
        logits = F.linear(xt.float(), layer.gate.weight.float())
        p = torch.softmax(logits[:n_dyn], -1)
        order = sorted(range(n_dyn), key=lambda i: (-p[i].item(), i))
        k, acc = 0, 0.0
        while k < n_dyn and (acc < cfg.top_p or k < cfg.min_k):
            acc += p[order[k]].item()
            k += 1
        if cfg.max_k is not None:
            k = min(k, cfg.max_k)
        kept = order[:k]
        w = _kept_weights(logits[:n_dyn], p, kept, cfg)
        shared_w = [1.0] * cfg.num_shared_experts
        if cfg.num_shared_experts and cfg.gate_shared:
            cand = kept + list(range(n_dyn, cfg.num_gate_outputs))
            joint = torch.softmax(logits[cand], -1)
            dyn_mass = joint[: len(kept)].sum()
            w = {i: v * dyn_mass for i, v in w.items()}
            shared_w = list(joint[len(kept):])
        y = torch.zeros_like(xt)
        for i, wi in w.items():
            if i < cfg.num_routed_experts:  # null experts contribute zero
                y = y + wi * _swiglu(xt, layer.experts[str(i)])
        for s, ex in enumerate(layer.shared):
            y = y + shared_w[s] * _swiglu(xt, ex)
        outs.append(y)
    return torch.stack(outs)


def _kept_weights(logits, p, kept, cfg):
    """{candidate: weight} of the kept candidates, in the three combine_weights modes."""
    if cfg.combine_weights == "raw":
        return {i: p[i] for i in kept}
    if cfg.combine_weights == "renormalize":
        return {i: p[i] / sum(p[j] for j in kept) for i in kept}
    m = released_code_multipliers(logits, len(kept), cfg.tie_eps)
    return {i: m[i] / sum(m.values()) for i in kept}


def _cfg(**kw):
    base = dict(hidden_size=12, routed_ffn_size=6, shared_ffn_size=4, num_routed_experts=6,
                num_null_experts=1, num_shared_experts=2, input_jitter=0.0)
    base.update(kw)
    return MoEConfig(**base)


def _grads(layer, x):
    return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("kw", [
    {}, dict(combine_weights="raw"), dict(combine_weights="reference"), dict(gate_shared=False),
    dict(min_k=2, max_k=2, num_null_experts=0),
    dict(top_p=0.4, max_k=3, num_shared_experts=0), dict(num_null_experts=2, min_k=2),
    dict(num_shared_experts=1), dict(num_shared_experts=1, gate_shared=False), dict(num_shared_experts=3),
])
def test_matches_per_token_reference(kw):
    _check_against_reference(kw)


def _seeded_layer(std: float, **kw) -> MoELayer:
    """Seed 0, then weights of the given std: larger than init, so routing is not uniform and outputs
    are not tiny."""
    torch.manual_seed(0)
    layer = MoELayer(_cfg(**kw))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=std)
    return layer


def _check_against_reference(kw):
    layer = _seeded_layer(0.5, **kw)
    x = torch.randn(24, 12)
    g_out = torch.randn(24, 12)
    x1 = x.clone().requires_grad_()
    out, aux = layer(x1)
    (out * g_out).sum().backward()
    ours = _grads(layer, x1)
    layer.zero_grad()
    x2 = x.clone().requires_grad_()
    ref = reference_forward(layer, x2)
    (ref * g_out).sum().backward()
    theirs = _grads(layer, x2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    assert aux.selected.shape == (24, layer.cfg.num_dynamic_experts)


def test_leading_shape_and_task_ids():
    torch.manual_seed(0)
    layer = MoELayer(_cfg())
    x = torch.randn(2, 5, 12)
    task = torch.tensor([[0] * 5, [1, 1, 1, -1, -1]])
    out, aux = layer(x, task_ids=task)
    assert out.shape == x.shape
    st = aux.stats
    assert st["tokens"] == 8 and set(st["per_task"]) == {0, 1}
    assert st["per_task"][1]["tokens"] == 3
    with pytest.raises(ValueError, match="task_ids"):
        layer(x, task_ids=task[:, :3])


def test_all_null_tokens_give_shared_only_and_zero_expert_grads():
    torch.manual_seed(0)
    layer = MoELayer(_cfg(gate_shared=False))
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[layer.cfg.num_routed_experts] = 5.0  # the null column dominates
    x = torch.rand(10, 12) + 0.5
    out, aux = layer(x)
    assert aux.selected[:, : layer.cfg.num_routed_experts].sum() == 0
    shared_only = sum(ex(x) for ex in layer.shared)
    torch.testing.assert_close(out, shared_only)
    out.sum().backward()
    for name, p in layer.experts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0, name
    assert aux.stats["all_null_fraction"] == 1.0 and aux.stats["null_share"] == 1.0


def test_losses_and_schedule():
    torch.manual_seed(0)
    cfg = _cfg(z_loss_weight=1e-3, entropy_loss_weight=1e-4)
    layer = MoELayer(cfg)
    _, aux = layer(torch.randn(16, 12))
    # uniform routing gives balance loss E * sum (k/E)(1/k) = ... >= 1; here just finite and positive
    assert aux.balance_loss.item() > 0 and aux.z_loss.item() > 0 and aux.entropy_loss.item() > 0
    assert balance_weight(0, cfg) == pytest.approx(0.025)
    assert balance_weight(5000, cfg) == pytest.approx(0.013)
    assert balance_weight(10000, cfg) == pytest.approx(0.001)
    assert balance_weight(20000, cfg) == pytest.approx(0.001)
    total, logs = combine_aux([aux, aux], step=0, cfg=cfg)
    expect = 0.025 * aux.balance_loss + 1e-3 * aux.z_loss + 1e-4 * aux.entropy_loss
    torch.testing.assert_close(total, expect)
    assert set(logs) >= {"balance_loss", "z_loss", "entropy_loss", "balance_weight"}
    total.backward()
    assert layer.gate.weight.grad.abs().sum() > 0


def test_padding_tokens_do_not_count_in_losses():
    torch.manual_seed(0)
    layer = MoELayer(_cfg())
    x = torch.randn(10, 12)
    _, aux_a = layer(x[:6], task_ids=torch.zeros(6, dtype=torch.long))
    _, aux_b = layer(x, task_ids=torch.tensor([0] * 6 + [-1] * 4))
    torch.testing.assert_close(aux_a.balance_loss, aux_b.balance_loss)
    torch.testing.assert_close(aux_a.z_loss, aux_b.z_loss)


def test_names_markers_and_jitter():
    layer = MoELayer(_cfg(input_jitter=0.01))
    names = dict(layer.named_parameters())
    assert names["gate.weight"].shape == (6 + 1 + 2, 12)
    assert names["experts.5.down_proj.weight"].shape == (12, 6)
    assert "shared.1.up_proj.weight" in names
    for n, p in layer.experts.named_parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1", n
    assert not hasattr(layer.gate.weight, "allreduce")
    x = torch.randn(64, 12)
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    torch.testing.assert_close(a, b)
    layer.train()
    torch.manual_seed(1)
    c, aux = layer(x)
    assert torch.isfinite(c).all()


def test_bfloat16_layer_runs_close_to_fp32():
    layer = _seeded_layer(0.3)
    x = torch.randn(32, 12)
    ref, _ = layer(x)
    layer_bf16 = MoELayer(_cfg()).to(torch.bfloat16)
    layer_bf16.load_state_dict(layer.state_dict())
    xb = x.to(torch.bfloat16).requires_grad_()
    out, aux = layer_bf16(xb)
    assert out.dtype == torch.bfloat16 and aux.balance_loss.dtype == torch.float32
    out.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and layer_bf16.gate.weight.grad is not None
    # same routing up to rare near-ties; outputs agree to bf16 precision
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
