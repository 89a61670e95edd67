"""Expert parallelism: EP=2 on 2 gloo ranks equals EP=1 for outputs and all gradients.

Cases: a random batch where expert 3 receives no token, a batch where every token on every rank picks only
the null expert, and a batch where rank 0's tokens are all null while rank 1's are not (rank 0 sends
nothing but still serves its experts).
Run: .venv/bin/pytest tests/test_moe_ep.py
"""

import torch
import torch.distributed as dist

from moe.config import MoEConfig
from moe.layer import MoELayer
from tests.distributed import run_distributed

D = 12


def _cfg():
    return MoEConfig(hidden_size=D, routed_ffn_size=6, shared_ffn_size=4, num_routed_experts=4,
                     num_null_experts=1, num_shared_experts=1, input_jitter=0.0)


def _reference_state(case):
    torch.manual_seed(0)
    ref = MoELayer(_cfg())
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.5)
        if case == "empty_expert":
            ref.gate.weight[3] = -3.0  # with positive inputs expert 3 is never chosen
        elif case in ("all_null", "null_on_rank0"):
            ref.gate.weight.zero_()
            ref.gate.weight[4] = 3.0  # the null column dominates positive inputs
    return ref.state_dict()


def _inputs(case, rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.rand(16, D, generator=g) + 0.2
    if case == "null_on_rank0" and rank == 1:
        x = -x  # negative inputs: the null column now loses
    return x, torch.randn(16, D, generator=g)


def _run_case(layer, x, g_out):
    x = x.clone().requires_grad_()
    out, aux = layer(x)
    (out * g_out).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in layer.named_parameters()}
    grads["x"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads, aux


def _ep_vs_reference(rank, world_size):
    group = dist.new_group([0, 1])
    report = {}
    for case in ("empty_expert", "all_null", "null_on_rank0"):
        sd = _reference_state(case)
        ref = MoELayer(_cfg())
        ref.load_state_dict(sd)
        ep = MoELayer(_cfg(), ep_group=group)
        assert sorted(ep.experts.keys()) == [str(2 * rank), str(2 * rank + 1)]
        ep.load_state_dict({k: v for k, v in sd.items()
                            if not k.startswith("experts.") or k.split(".")[1] in ep.experts})
        x, g_out = _inputs(case, rank)
        out, grads, aux = _run_case(ep, x, g_out)
        # non-expert reference: this rank's tokens only; expert reference: both ranks' tokens
        ref_out, ref_local, _ = _run_case(ref, x, g_out)
        xs, gs = zip(*(_inputs(case, r) for r in range(world_size)))
        _, ref_all, _ = _run_case(ref, torch.cat(xs), torch.cat(gs))
        diffs = {"out": (out - ref_out).abs().max().item()}
        for name, grad in grads.items():
            want = ref_all[name] if name.startswith("experts.") else ref_local[name]
            diffs[name] = (grad - want).abs().max().item()
            diffs[name + ":norm"] = want.norm().item()
        report[case] = {"diffs": diffs, "routed": int(aux.selected[:, :4].sum()),
                        "expert3": int(aux.selected[:, 3].sum())}
    return report


def test_ep2_equals_ep1():
    results = run_distributed(_ep_vs_reference, world_size=2)
    for rank, report in enumerate(results):
        for case, rec in report.items():
            bad = {k: v for k, v in rec["diffs"].items() if not k.endswith(":norm") and v > 1e-5}
            assert not bad, f"rank {rank} case {case}: {bad}"
    # the cases test what they claim
    assert all(r["empty_expert"]["expert3"] == 0 and r["empty_expert"]["routed"] > 0 for r in results)
    assert all(r["all_null"]["routed"] == 0 for r in results)
    assert results[0]["null_on_rank0"]["routed"] == 0
    assert results[1]["null_on_rank0"]["routed"] > 0
    # rank 0 serves experts 0-1 with rank 1's tokens only: its expert grads are not zero
    assert results[0]["null_on_rank0"]["diffs"]["experts.0.gate_proj.weight:norm"] > 0
