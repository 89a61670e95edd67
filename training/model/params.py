"""Parameter counts of an AudioLM from its config alone (no model is built): total and active per token.

With Top-P routing the number of routed experts a token uses is dynamic:
    min  = max(min_k, 1) selections, all of them null experts when there are enough (so possibly 0 routed)
    max  = min(ceil(top_p * (routed + null)), max_k, routed): the sorted prefix that reaches top_p is never
           longer than ceil(p * N) (the top k of N probabilities hold at least k/N of the mass)
    mean = `mean_routed_experts` if given (e.g. measured "experts per token" from the routing stats),
           else the midpoint of min and max (a planning estimate, not a measurement)
Shared experts and the gate are always active.
"""

from __future__ import annotations

import math

from training.model.lm import ModelConfig


def moe_numbers(cfg: ModelConfig) -> dict:
    kw = cfg.moe_kwargs()
    return {"routed": int(kw.get("num_routed_experts", 8)), "null": int(kw.get("num_null_experts", 1)),
            "shared": int(kw.get("num_shared_experts", 2)), "top_p": float(kw.get("top_p", 0.7)),
            "min_k": int(kw.get("min_k", 1) or 1), "max_k": kw.get("max_k"),
            "routed_ffn": int(kw["routed_ffn_size"]), "shared_ffn": int(kw["shared_ffn_size"])}


def routed_experts_per_token(cfg: ModelConfig) -> tuple[int, int]:
    """(min, max) number of routed (real) experts a token can use in an MoE layer."""
    m = moe_numbers(cfg)
    n_dyn = m["routed"] + m["null"]
    hi = min(math.ceil(m["top_p"] * n_dyn - 1e-9), n_dyn)
    if m["max_k"] is not None:
        hi = min(hi, int(m["max_k"]))
    lo_sel = min(max(m["min_k"], 1), hi)
    return max(lo_sel - m["null"], 0), min(hi, m["routed"])


def parameter_counts(cfg: ModelConfig, mean_routed_experts: float | None = None) -> dict:
    """{"total", "active_min", "active_mean", "active_max", "embedding", "heads", "routed_expert",
    "routed_per_token_min", "routed_per_token_max"}; counts are numbers of parameters (ints except
    active_mean)."""
    D, F, K = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_codebooks
    embedding = cfg.padded_text_vocab_size * D + K * cfg.audio_vocab_size * D
    heads = K * cfg.padded_audio_vocab_size * D
    kv = cfg.num_kv_heads * cfg.head_dim
    attn = 2 * D * D + 2 * D * kv + 2 * D  # q, k, v, out projections; the two norms of the block
    dense_ffn = 3 * D * F
    n_moe = len(cfg.moe_layer_ids)
    n_dense = cfg.num_layers - n_moe
    always = embedding + heads + D + cfg.num_layers * attn + n_dense * dense_ffn
    out = {"embedding": embedding, "heads": heads, "routed_expert": 0,
           "routed_per_token_min": 0, "routed_per_token_max": 0}
    if n_moe == 0:
        return {**out, "total": always, "active_min": always, "active_mean": float(always),
                "active_max": always}
    m = moe_numbers(cfg)
    expert = 3 * D * m["routed_ffn"]
    gate = (m["routed"] + m["null"] + m["shared"]) * D
    shared = m["shared"] * 3 * D * m["shared_ffn"]
    always += n_moe * (gate + shared)
    lo, hi = routed_experts_per_token(cfg)
    mean = (lo + hi) / 2 if mean_routed_experts is None else float(mean_routed_experts)
    return {**out, "routed_expert": expert, "routed_per_token_min": lo, "routed_per_token_max": hi,
            "total": always + n_moe * m["routed"] * expert,
            "active_min": always + n_moe * lo * expert,
            "active_mean": always + n_moe * mean * expert,
            "active_max": always + n_moe * hi * expert}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mean_routed_experts: float | None = None) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style: 6 * active matmul parameters (the
    embedding lookups excluded, the output heads included) + 12 * layers * hidden * seq_len (attention
    scores and values). For an MFU estimate: tokens/s * this / peak FLOP/s."""
    c = parameter_counts(cfg, mean_routed_experts)
    return 6.0 * (c["active_mean"] - c["embedding"]) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
