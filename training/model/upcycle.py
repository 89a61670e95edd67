"""Upcycling (paper, stage 2): dense specialists -> one MoE AudioLM.

For every MoE layer, each of the S specialists gives P = num_routed_experts / S routed experts (specialist
by specialist: expert s * P + j is specialist s's j-th). Expert j is the contiguous slice of width
Fr = routed_ffn_size of the specialist's FFN hidden dimension (width F) that starts at (j * Fr) mod F,
the released code's round robin:
    expert.gate_proj = gate_proj[o:o+Fr, :]   expert.up_proj = up_proj[o:o+Fr, :]
    expert.down_proj = down_proj[:, o:o+Fr]   (o = (j * Fr) mod F)
Our 2 x 4 with Fr = F / 4: each specialist's FFN cut into its 4 quarters, whose sum is the dense FFN. The
paper's 4 x 2 with the released width F / 4: quarters 0 and 1 of each specialist (P * Fr < F leaves the
rest out; P * Fr > F repeats slices). Attention, norms, embeddings, heads (and the FFN of layers that
stay dense) are the average of the specialists. The router gate and the shared experts start fresh
(normal(0, init_std) from `seed`, identical on every rank).
"""

from __future__ import annotations

import re

import torch

from training.model.lm import AudioLM, ModelConfig

_DENSE_FFN = re.compile(r"^layers\.(\d+)\.ffn\.(gate_proj|up_proj|down_proj)\.weight$")


def _plain_state_dict(spec) -> dict:
    sd = spec.state_dict() if isinstance(spec, torch.nn.Module) else dict(spec)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v.detach().float().cpu() if v.is_floating_point() else v for k, v in sd.items()}


def experts_per_specialist(cfg: ModelConfig, n_specialists: int) -> int:
    """P, the routed experts each specialist contributes; raises when the numbers do not fit."""
    kw = cfg.moe_kwargs()
    n_routed, width = int(kw.get("num_routed_experts", 8)), int(kw["routed_ffn_size"])
    F = cfg.ffn_hidden_size
    if n_specialists < 1:
        raise ValueError("upcycle: need at least one specialist")
    if F % width:
        raise ValueError(f"upcycle: moe.routed_ffn_size={width} must divide the specialists' "
                         f"ffn_hidden_size={F} (each expert is one contiguous slice of a dense FFN)")
    if n_routed % n_specialists:
        raise ValueError(f"upcycle: moe.num_routed_experts={n_routed} must be a multiple of the number of "
                         f"specialists {n_specialists} (each gives the same number of experts)")
    return n_routed // n_specialists


def expert_slice(j: int, width: int, ffn: int) -> slice:
    """The hidden-dimension slice of a specialist's FFN that becomes its j-th expert."""
    start = (j * width) % ffn
    return slice(start, start + width)


def upcycle_state_dict(specialists: list, moe_cfg: ModelConfig, seed: int = 0) -> dict:
    """Full MoE state dict (all experts, global expert ids) from dense specialists' state dicts or models."""
    if not moe_cfg.is_moe:
        raise ValueError("upcycle: the target ModelConfig has no MoE layers (set model.moe / moe_layers)")
    sds = [_plain_state_dict(s) for s in specialists]
    per_specialist = experts_per_specialist(moe_cfg, len(sds))
    keys = set(sds[0])
    for i, sd in enumerate(sds[1:], 1):
        if set(sd) != keys:
            diff = sorted(keys.symmetric_difference(sd))[:5]
            raise ValueError(f"upcycle: specialist {i} has different parameters from specialist 0 "
                             f"({diff} ...); all specialists must share one dense architecture")
        for k in keys:
            if sd[k].shape != sds[0][k].shape:
                raise ValueError(f"upcycle: {k} is {tuple(sd[k].shape)} in specialist {i} but "
                                 f"{tuple(sds[0][k].shape)} in specialist 0")
    moe_layers = set(moe_cfg.moe_layer_ids)
    kw = moe_cfg.moe_kwargs()
    width = int(kw["routed_ffn_size"])
    out = {}
    for k in sorted(keys):
        m = _DENSE_FFN.match(k)
        if m and int(m.group(1)) in moe_layers:
            layer, proj = int(m.group(1)), m.group(2)
            for s, sd in enumerate(sds):
                for j in range(per_specialist):
                    rows = expert_slice(j, width, moe_cfg.ffn_hidden_size)
                    w = sd[k][:, rows] if proj == "down_proj" else sd[k][rows]
                    out[f"layers.{layer}.ffn.experts.{s * per_specialist + j}.{proj}.weight"] = w.clone()
        else:
            floating = sds[0][k].is_floating_point()
            out[k] = torch.stack([sd[k] for sd in sds]).mean(0) if floating else sds[0][k]
    # fresh router and shared experts, the same on every rank
    g = torch.Generator().manual_seed(seed)
    D, std = moe_cfg.hidden_size, float(kw.get("init_std", moe_cfg.init_std))
    n_gate = int(kw.get("num_routed_experts", 8)) + int(kw.get("num_null_experts", 1)) + \
        int(kw.get("num_shared_experts", 2))
    Fs = int(kw["shared_ffn_size"])
    for layer in sorted(moe_layers):
        p = f"layers.{layer}.ffn"
        out[f"{p}.gate.weight"] = torch.randn(n_gate, D, generator=g) * std
        for s in range(int(kw.get("num_shared_experts", 2))):
            out[f"{p}.shared.{s}.gate_proj.weight"] = torch.randn(Fs, D, generator=g) * std
            out[f"{p}.shared.{s}.up_proj.weight"] = torch.randn(Fs, D, generator=g) * std
            out[f"{p}.shared.{s}.down_proj.weight"] = torch.randn(D, Fs, generator=g) * std
    return out


def upcycle(specialists: list, moe_cfg: ModelConfig, ep_group=None, seed: int = 0) -> AudioLM:
    """Build the MoE AudioLM (this rank's experts under EP) initialised from the specialists."""
    full = upcycle_state_dict(specialists, moe_cfg, seed)
    model = AudioLM(moe_cfg, ep_group=ep_group)
    own = model.state_dict()
    missing = sorted(set(own) - set(full))
    if missing:
        raise ValueError(f"upcycle: no value for {missing[:5]} (model and upcycling rules disagree)")
    model.load_state_dict({k: full[k].to(own[k].dtype) for k in own})
    return model
