"""Memory per GPU of one training layout: weights, gradients, optimizer states, activations, all-to-all
buffers and a fixed overhead. Used by `unimoe plan` (training/cluster/plan.py).

Parameters (placement as training/model/tensor_parallel.py shards them): attention projections, dense
FFNs, the text embedding and the output heads are split by TP; norms, codebook embeddings, MoE gates and
shared experts are replicated on every TP rank; routed experts are split by EP (each rank holds
num_routed_experts / EP of them). Bytes per parameter: weights and gradients 2 (bf16) or 4 (fp32); Adam
m and v 4 + 4, plus an fp32 master copy of the weights 4 under bf16. ZeRO shards over the data-parallel
group (dense parameters: DP = N / TP; experts: the expert-data-parallel group DP / EP): stage 1 the
optimizer states, stage 2 also the gradients, stage 3 also the weights.

Activations: what one micro-batch keeps alive between its forward and its backward, derived op by op
from this repository's model (training/model/lm.py, moe/), per token and in bytes (b = 2 for bf16, 4 for
fp32; tensors the code computes in fp32 count 4):
  - RMSNorm: its input as fp32 (4D), the normalised input (bD), the rsqrt (4);
  - attention: the input of the QKV projection (bD), then (7 x H*Dh) b with one KV head per head (the
    QKV output, kept alive by v; rotated q and k; SDPA output; o_proj input) or (5 x H*Dh) b with
    grouped KV heads (rotated q; k and v repeated to every head; output; o_proj input); the logsumexp
    of the fused attention (4 per head): linear in the sequence length (no [L, L] matrix);
  - dense SwiGLU: its input (bD) and 4 F-wide tensors (gate out, silu, up out, their product);
  - MoE layer: its input (bD), the jittered fp32 router input and its noise (8D), the shared experts'
    five hidden tensors (5 b S*Fs: gate out, silu, up out, their product, the product times the block
    gates) and gates, the router's fp32 intermediates (about 10 (R+Z) + 2 G + 10 floats, G = gate
    outputs), and per routed (token, expert) pair its gathered token row and its output row (2 b D), the
    expert's four hidden tensors (4 b Fr, as in the dense SwiGLU), its combine weight and 24 bytes of
    indices (8 more with EP > 1: the segment permutation). Pairs per token: the MAXIMUM number of routed
    experts Top-P can pick (an untrained or collapsing router comes close to it; balanced over EP ranks);
  - output: the final norm, the heads' input, fp32 log-probabilities of the K codebook heads
    (4 K V / TP), the logits held by the model output (b K V / TP), target and index bookkeeping.
Tensor parallelism divides the attention internals and the dense FFN's hidden tensors; the MoE layer and
the norms see every token on every TP rank unless `parallel.sequence_parallel` is on, which divides
them by TP too. `model.recompute`: "block" keeps only each block's input (bD) and recomputes one block
at a time in backward; "moe" keeps each MoE sublayer's input instead of its internals.
Routed expert weights are not kept for backward (moe.experts.GroupedMM saves the per-expert weights, not
their stack); their grouped GEMM's backward stacks one projection and writes its weight gradient, a
transient of 2 b (N_r / EP) Fr D.
Transients on top: at the start of backward the logits' gradient (2 b K V / TP, plus one fp32 codebook);
with EP > 1, one MoE layer's send/receive buffers (3 b D per pair). The fixed overhead (CUDA context,
NCCL buffers, allocator reserve) is an assumption, stated and overridable.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.config import TrainConfig
from training.model.lm import RECOMPUTE
from training.model.params import moe_numbers, parameter_counts, routed_experts_per_token

GiB = 1024**3
MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "a2a_buffers", "overhead")


@dataclass
class Workload:
    """What one optimizer step computes, whatever the layout."""

    model: object  # training.model.ModelConfig
    global_batch: int  # samples per optimizer step
    micro_batch: int | None  # per rank and forward pass; None = global_batch / dp
    seq_len: int
    precision: str = "bf16"
    zero_stage: int = 2
    recompute: str = "none"
    sequence_parallel: bool = False
    overlap_comm: bool = False  # ZeRO reduces gradients during backward (ds_config overlap_comm)

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"model.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def micro(self, dp: int) -> int:
        return self.micro_batch or max(self.global_batch // dp, 1)


def workload_from_config(cfg: TrainConfig, seq_len: int | None = None) -> Workload:
    import json

    mcfg = cfg.model_config()
    overlap = False
    try:
        with open(cfg.parallel.ds_config_path()) as f:
            overlap = bool(json.load(f).get("zero_optimization", {}).get("overlap_comm", False))
    except (OSError, ValueError):
        pass
    return Workload(mcfg, cfg.data.global_batch_size, cfg.data.micro_batch_size,
                    seq_len or mcfg.max_seq_len, cfg.parallel.precision, cfg.parallel.zero_stage,
                    mcfg.recompute,
                    cfg.parallel.sequence_parallel_requested, overlap)


def moe_sizes(m) -> dict:
    n = moe_numbers(m)
    r, z, s = n["routed"], n["null"], n["shared"]
    return {"routed": r, "dynamic": r + z, "gates": r + z + s, "shared": s, "routed_ffn": n["routed_ffn"],
            "shared_total": s * n["shared_ffn"]}


def parameter_split(m) -> dict:
    """Parameter counts by placement: split by TP, replicated on every TP rank, routed experts (split by EP).
    Also the counts of training.model.params.parameter_counts (total, active per token ...)."""
    counts = parameter_counts(m)
    D, L = m.hidden_size, m.num_layers
    n_moe = len(m.moe_layer_ids)
    kv = m.num_kv_heads * m.head_dim
    tp_split = (L * (2 * D * D + 2 * D * kv) + (L - n_moe) * 3 * D * m.ffn_hidden_size
                + m.padded_text_vocab_size * D + counts["heads"])
    experts = n_moe * moe_sizes(m)["routed"] * counts["routed_expert"] if n_moe else 0
    replicated = counts["total"] - tp_split - experts
    return {**counts, "tp_split": tp_split, "replicated": replicated, "experts": experts}


def max_routed_per_token(m) -> int:
    return routed_experts_per_token(m)[1] if m.is_moe else 0


def activation_terms(w: Workload, tp: int, ep: int, experts_per_token: float | None = None) -> dict:
    """Bytes per token of one micro-batch (see the module docstring), by part, on one GPU; routed pairs per
    token: Top-P's maximum unless `experts_per_token` is given."""
    m, b = w.model, w.act_bytes
    D, hq, F = m.hidden_size, m.num_heads * m.head_dim, m.ffn_hidden_size
    sp = tp if w.sequence_parallel else 1  # what SP divides: norms, layer inputs, the MoE layer
    norm = ((4 + b) * D + 4) / sp
    inner = 7 * hq if m.num_kv_heads == m.num_heads else 5 * hq
    attention = norm + b * (D / sp + inner / tp) + 4 * m.num_heads / tp
    dense = norm + b * (D / sp + 4 * F / tp)
    moe = moe_pairs = 0.0
    if m.is_moe:
        s = moe_sizes(m)
        moe = norm + (b * (D + 5 * s["shared_total"] + s["shared"]) + 8 * D
                      + 4 * (10 * s["dynamic"] + 2 * s["gates"] + 10) + s["dynamic"] + s["gates"]) / sp
        per_pair = (2 * D + 4 * s["routed_ffn"]) * b + b + 24 + (8 if ep > 1 else 0)
        k = max_routed_per_token(m) if experts_per_token is None else experts_per_token
        moe_pairs = k * per_pair / sp
        moe += moe_pairs
    K, V = m.num_codebooks, m.padded_audio_vocab_size
    head = norm + b * D / sp + (4 + b) * K * V / tp + 20 * K + 8 + 4 * m.head_dim
    return {"attention": attention, "dense_ffn": dense, "moe": moe, "moe_pairs": moe_pairs, "head": head,
            "logits_grad": (2 * b * K * V + 8 * V) / tp, "a2a_per_token": 3 * b * D * max_routed_per_token(m)
            / sp if ep > 1 else 0.0, "layer_input": b * D / sp}


def moe_constants(w: Workload) -> float:
    """Token-independent bytes an MoE layer keeps for backward: the concatenated shared-expert weights and
    the router weight's fp32 copy under bf16."""
    m, b = w.model, w.act_bytes
    if not m.is_moe:
        return 0.0
    s = moe_sizes(m)
    return (3 * m.hidden_size * s["shared_total"] * b if s["shared"] > 1 else 0) + (
        4 * s["gates"] * m.hidden_size if b != 4 else 0)


def grouped_gemm_transient(w: Workload, ep: int) -> float:
    """Bytes the backward of one MoE layer's grouped GEMM holds at once: one projection's stacked weights
    and its weight gradient (the module docstring)."""
    m = w.model
    if not m.is_moe:
        return 0.0
    s = moe_sizes(m)
    return 2 * w.act_bytes * s["routed"] / ep * s["routed_ffn"] * m.hidden_size


def activations(w: Workload, tp: int, ep: int, micro: int, experts_per_token: float | None = None) -> dict:
    """Bytes of one micro-batch on one GPU: kept (saved for backward + the output's logits), the backward
    transient, the EP all-to-all buffers; with `model.recompute`."""
    t = activation_terms(w, tp, ep, experts_per_token)
    m = w.model
    tokens = micro * w.seq_len
    n_moe = len(m.moe_layer_ids)
    n_dense = m.num_layers - n_moe
    layer_attn_dense = t["attention"] + t["dense_ffn"]
    layer_attn_moe = t["attention"] + t["moe"]
    const = n_moe * moe_constants(w)
    recompute_peak = 0.0  # one layer (or MoE sublayer) rebuilt during backward
    if w.recompute == "block":
        per_token = m.num_layers * t["layer_input"]
        recompute_peak = tokens * max(layer_attn_moe if n_moe else 0, layer_attn_dense if n_dense else 0)
        recompute_peak += moe_constants(w) if n_moe else 0
        const = 0.0
    elif w.recompute == "moe" and n_moe:
        per_token = n_dense * layer_attn_dense + n_moe * (t["attention"] + t["layer_input"])
        recompute_peak = tokens * t["moe"] + moe_constants(w)
        const = 0.0
    else:
        per_token = n_dense * layer_attn_dense + n_moe * layer_attn_moe
    layers = tokens * per_token + const
    head = tokens * t["head"]
    return {"layers": layers, "head": head, "kept": layers + head,
            "transient": max(tokens * t["logits_grad"], recompute_peak, grouped_gemm_transient(w, ep)),
            "a2a_buffers": tokens * t["a2a_per_token"], "tokens": tokens}


def memory_per_gpu(w: Workload, world: int, tp: int, ep: int, overhead_gib: float = 0.0) -> dict:
    """Bytes per GPU: weights, grads, optimizer, activations (kept + backward transient), all-to-all buffers,
    overhead and their sum, total (see the module docstring)."""
    split = parameter_split(w.model)
    dp = world // tp
    edp = max(dp // ep, 1)
    bf16 = w.precision == "bf16"
    w_bytes = 2 if bf16 else 4
    opt_bytes = 8 + (4 if bf16 else 0)
    dense = split["tp_split"] / tp + split["replicated"]
    experts = split["experts"] / ep

    def sharded(n_bytes: float, zero_from: int) -> float:
        if w.zero_stage >= zero_from:
            return n_bytes * (dense / dp + experts / edp)
        return n_bytes * (dense + experts)

    micro = w.micro(dp)
    act = activations(w, tp, ep, micro)
    mem = {"weights": sharded(w_bytes, 3), "grads": sharded(w_bytes, 2), "optimizer": sharded(opt_bytes, 1),
           "activations": act["kept"] + act["transient"], "activations_kept": act["kept"],
           "a2a_buffers": act["a2a_buffers"], "overhead": overhead_gib * GiB, "micro_batch": micro,
           "seq_len": w.seq_len, "params_per_gpu": dense + experts}
    mem["total"] = sum(mem[k] for k in MEMORY_PARTS)
    return mem
