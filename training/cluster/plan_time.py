"""Step time of one training layout from a roofline model: matmuls at a stated fraction of the GPU's
peak, the other (elementwise) work at HBM bandwidth, and the collectives at link bandwidth. Used by
`unimoe plan` (training/cluster/plan.py); every number below is printed there and can be overridden.

Per micro-batch on one GPU (T = micro-batch x sequence tokens of its data-parallel rank):
  - matmul FLOPs, forward + backward = 3 x forward: attention projections and dense FFNs / TP; attention
    scores 6 T s H*Dh / TP (causal: half of the 12 T s H*Dh the MFU convention counts); the MoE layer's
    gate, shared experts and routed experts (mean routed experts per token) on T tokens per GPU: the
    whole layer runs on every TP rank, T / TP with sequence parallelism; heads / TP. `model.recompute`
    adds one forward of the recomputed part. Time = FLOPs / (peak x matmul_efficiency); fp32 runs use
    half the bf16 peak (TF32).
  - elementwise work (norms, activations, router, permutation): `elementwise_passes` x the activation
    bytes the micro-batch keeps with the mean routed experts per token (write in forward, read +
    gradient in backward) at HBM bandwidth.
  - TP: per layer one all-reduce of [T, D] after attention and one for its input gradient (two more for a
    dense FFN), plus the vocab-parallel embedding and heads; ring all-reduce 2 (n-1)/n x bytes / bandwidth
    (with sequence parallelism the same bytes move as all-gather + reduce-scatter).
  - EP: per MoE layer 4 all-to-alls (dispatch and combine, forward and backward; 6 when the layer is
    recomputed) of k T D bytes, (n-1)/n of them leave the GPU.
Per optimizer step: data-parallel gradient reduction and the ZeRO parameter all-gather over DP (dense
parameters) and the expert-data-parallel group (experts): ZeRO 0 all-reduce; 1 reduce-scatter once per
step; 2 reduce-scatter per micro-batch (gradients are partitioned as they are produced); 3 also
all-gathers the weights in forward and backward of every micro-batch. Gradient reduction is hidden behind
backward when the ds_config overlaps it (`overlap_comm`), the parameter all-gather only when stated
(`overlap_param_gather`, Megatron's option; DeepSpeed ZeRO 1/2 does not). The Adam update streams its
shard's weights, gradients and states through HBM (30 bytes per parameter).

Placement (megatron-core's order: TP ranks adjacent, then DP; DeepSpeed's EP groups are blocks of EP
consecutive DP ranks): a group spanning `span` consecutive GPUs stays inside a node when span <=
gpus_per_node and then runs at NVLink bandwidth, else at the inter-node bandwidth (one NIC share per GPU);
an all-to-all that spans nodes sends its off-node part over the inter-node links.
Pipeline parallelism (pp > 1) is not a layout `unimoe train` runs; it exists to compare with published
pipeline-parallel figures: each GPU holds L / pp layers, the interleaved schedule's bubble adds
(pp - 1) / (vpp x micro-batches) and the stage-to-stage sends are taken as overlapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.cluster.gpus import GPUS, Hardware
from training.cluster.plan_memory import Workload, activations, moe_sizes, parameter_split
from training.model.params import routed_experts_per_token, train_flops_per_token

# Dense peak of a precision over the bf16 one: fp32 runs on CUDA use TF32 (training.cluster.parallel.
# use_tf32), half the bf16 peak on the GPUs known here (H100/H200 495, A100 156, L40S 181, A10 62.5 TFLOP/s)
PEAK_OVER_BF16 = {"bf16": 1.0, "fp32": 0.5}


@dataclass
class Assumptions:
    matmul_efficiency: float = 0.6  # of the dense peak: large bf16 GEMMs reach ~0.7-0.8; expert GEMMs and
    #                                 attention kernels less
    hbm_efficiency: float = 0.8
    link_efficiency: float = 0.75  # achieved fraction of NVLink / NIC line rate in NCCL collectives
    elementwise_passes: float = 3.0  # HBM traffic of the non-matmul work, in kept-activation bytes
    overhead_gib: float = 3.0  # CUDA context + kernels, NCCL buffers, caching-allocator reserve
    overlap_param_gather: bool = False
    experts_per_token: float | None = None  # mean routed experts per token (None: midpoint of min, max)
    experts_source: str = "midpoint of Top-P's min and max"
    time_scale: float = 1.0  # --calibrate: measured / predicted step time of a real run


@dataclass
class Layout:
    tp: int
    ep: int
    dp: int
    pp: int = 1
    vpp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp


def _bandwidth(hw: Hardware, a: Assumptions, span: int) -> float:
    """Bytes/s per GPU of a ring collective over a group spanning `span` consecutive GPUs."""
    gbps = hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps
    return gbps * 1e9 / 8 * a.link_efficiency


def _all_to_all(hw: Hardware, a: Assumptions, n: int, stride: int, nbytes: float) -> float:
    """Seconds for an all-to-all in which each GPU sends `nbytes` spread evenly over n peers placed
    `stride` GPUs apart; on-node and off-node parts move at the same time."""
    if n <= 1:
        return 0.0
    local = max(1, min(n, hw.gpus_per_node // stride))
    intra = nbytes * (local - 1) / n / (hw.intra_node_gbps * 1e9 / 8 * a.link_efficiency)
    inter = nbytes * (n - local) / n / (hw.inter_node_gbps * 1e9 / 8 * a.link_efficiency)
    return max(intra, inter)


def mean_experts_per_token(w: Workload, a: Assumptions) -> float:
    if not w.model.is_moe:
        return 0.0
    if a.experts_per_token is not None:
        return a.experts_per_token
    lo, hi = routed_experts_per_token(w.model)
    return (lo + hi) / 2


def matmul_flops(w: Workload, lay: Layout, k: float, micro: int) -> dict:
    """Executed matmul FLOPs of one micro-batch on one GPU (forward + backward), by part."""
    m = w.model
    D, hq = m.hidden_size, m.num_heads * m.head_dim
    kv = m.num_kv_heads * m.head_dim
    T = micro * w.seq_len
    tp = lay.tp
    t_moe = T / tp if w.sequence_parallel else T
    n_moe = len(m.moe_layer_ids)
    n_dense = m.num_layers - n_moe
    attn = 6 * T * (2 * D * hq + 2 * D * kv) / tp + 6 * T * w.seq_len * hq / tp
    dense = 18 * T * D * m.ffn_hidden_size / tp
    moe = 0.0
    if n_moe:
        s = moe_sizes(m)
        moe = 6 * t_moe * D * s["gates"] + 18 * t_moe * D * (s["shared_total"] + k * s["routed_ffn"])
    layers = (m.num_layers * attn + n_dense * dense + n_moe * moe) / lay.pp
    recompute = 0.0  # one more forward (a third of forward + backward) of what is recomputed
    if w.recompute == "block":
        recompute = layers / 3
    elif w.recompute == "moe":
        recompute = n_moe * moe / 3 / lay.pp
    heads = 6 * T * D * m.num_codebooks * m.padded_audio_vocab_size / tp / lay.pp
    return {"layers": layers, "heads": heads, "recompute": recompute, "total": layers + heads + recompute,
            "moe_per_layer": moe}


def step_time(w: Workload, lay: Layout, hw: Hardware, a: Assumptions) -> dict:
    """Seconds per optimizer step on this layout, by part, and the tokens/s, MFU and TFLOP/s per GPU."""
    m = w.model
    b = w.act_bytes
    micro = w.micro(lay.dp)
    n_micro = max(w.global_batch // (micro * lay.dp), 1)
    T = micro * w.seq_len
    k = mean_experts_per_token(w, a)
    peak = hw.bf16_tflops * 1e12 * PEAK_OVER_BF16[w.precision]  # fp32 runs: TF32
    flops = matmul_flops(w, lay, k, micro)
    compute = flops["total"] / (peak * a.matmul_efficiency)
    act = activations(w, lay.tp, lay.ep, micro, experts_per_token=k)
    elementwise = a.elementwise_passes * act["kept"] / lay.pp / (hw.hbm_tbps * 1e12 * a.hbm_efficiency)

    n_moe = len(m.moe_layer_ids)
    n_dense = m.num_layers - n_moe
    tp_comm = 0.0
    if lay.tp > 1:
        allreduces = (m.num_layers * 2 + n_dense * 2) / lay.pp + 2
        if w.recompute == "block":
            allreduces += (m.num_layers + n_dense) / lay.pp
        tp_comm = allreduces * 2 * (lay.tp - 1) / lay.tp * T * m.hidden_size * b / _bandwidth(hw, a, lay.tp)
    ep_comm = 0.0
    if lay.ep > 1 and n_moe:
        t_moe = T / lay.tp if w.sequence_parallel else T
        per_a2a = t_moe * k * (m.hidden_size * b + 4)  # token rows + their fp32 combine weights
        count = 4 + (2 if w.recompute in ("block", "moe") else 0)
        ep_comm = count * n_moe / lay.pp * _all_to_all(hw, a, lay.ep, lay.tp, per_a2a)

    per_micro = compute + elementwise + tp_comm + ep_comm
    bubble = (lay.pp - 1) / (lay.vpp * n_micro) if lay.pp > 1 else 0.0
    dp_comm, dp_exposed, optimizer = _data_parallel(w, lay, hw, a, n_micro, compute)
    total = (n_micro * per_micro * (1 + bubble) + dp_exposed + optimizer) * a.time_scale
    tokens = w.global_batch * w.seq_len
    model_flops = train_flops_per_token(m, w.seq_len, k if m.is_moe else None) * tokens
    return {"compute": n_micro * compute, "elementwise": n_micro * elementwise, "tp_comm": n_micro * tp_comm,
            "ep_comm": n_micro * ep_comm, "pp_bubble": n_micro * per_micro * bubble, "dp_comm": dp_comm,
            "dp_exposed": dp_exposed, "optimizer": optimizer, "step_s": total, "tokens_per_s": tokens / total,
            "tflops_per_gpu": model_flops / total / lay.world / 1e12,
            "mfu": model_flops / total / lay.world / peak,
            "micro_batches": n_micro, "experts_per_token": k,
            "placement": placement(lay, hw)}


def _data_parallel(w: Workload, lay: Layout, hw: Hardware, a: Assumptions, n_micro: int,
                   compute_per_micro: float) -> tuple[float, float, float]:
    """(collective seconds per step, the part not hidden behind compute, Adam update seconds)."""
    split = parameter_split(w.model)
    dense = (split["tp_split"] / lay.tp + split["replicated"]) / lay.pp
    experts = split["experts"] / lay.ep / lay.pp
    b = w.act_bytes
    bw = _bandwidth(hw, a, lay.tp * lay.dp)
    grad = gather = 0.0
    for n_params, n in ((dense, lay.dp), (experts, max(lay.dp // lay.ep, 1))):
        if n <= 1 or not n_params:
            continue
        frac = (n - 1) / n
        if w.zero_stage == 0:
            grad += 2 * frac * n_params * b / bw
        elif w.zero_stage == 1:
            grad += frac * n_params * b / bw
            gather += frac * n_params * b / bw
        else:
            grad += n_micro * frac * n_params * b / bw
            gather += (2 * n_micro if w.zero_stage == 3 else 1) * frac * n_params * b / bw
    # overlapped reduction hides behind backward: of every micro-batch under ZeRO 2/3 (reduced as produced),
    # of the last one under ZeRO 0/1 (reduced once, at the end of accumulation)
    window = (n_micro if w.zero_stage >= 2 else 1) * compute_per_micro * 2 / 3
    exposed_grad = max(0.0, grad - window) if w.overlap_comm else grad
    exposed = exposed_grad + (0.0 if a.overlap_param_gather else gather)
    shard = dense / (lay.dp if w.zero_stage >= 1 else 1) + experts / (
        max(lay.dp // lay.ep, 1) if w.zero_stage >= 1 else 1)
    optimizer = 30 * shard / (hw.hbm_tbps * 1e12 * a.hbm_efficiency)
    return grad + gather, exposed, optimizer


def placement(lay: Layout, hw: Hardware) -> dict:
    """Which groups stay inside a node (NVLink) and which cross nodes."""
    g = hw.gpus_per_node

    def where(span: int, n: int) -> str:
        return "-" if n <= 1 else ("intra" if span <= g else "inter")

    return {"tp": where(lay.tp, lay.tp), "ep": where(lay.tp * lay.ep, lay.ep),
            "dp": where(lay.tp * lay.dp, lay.dp)}


def mixtral_reference() -> dict:
    """Mixtral-8x7B as Megatron-Core published it (megatron/core/transformer/moe/README.md, MCore v0.9:
    468 TFLOP/s per GPU, bf16, dropless, all-to-all dispatcher): 64 H100 80GB (8 per node, NVLink 4,
    8 x 400 Gbit/s InfiniBand), TP 1, EP 8, PP 4, VPP 8 (32 layers), micro-batch 1, global batch 256,
    sequence 4096, vocab 32K, distributed optimizer with overlapped gradient reduce and parameter
    gather (ZeRO-1 semantics), sequence parallelism on, no recompute. The model: 32 layers, hidden 4096,
    32 heads with 8 KV groups, 8 experts of SwiGLU width 14336, top-2, untied embeddings; written as our
    ModelConfig with one codebook of 32000 entries (32000 with BOS/EOS/PAD) and no null or shared experts.
    Their TFLOP/s use the same FLOP count as training.model.params.train_flops_per_token."""
    from training.model import ModelConfig

    mcfg = ModelConfig(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                       num_codebooks=1, codebook_size=31997, delay_pattern="none", text_vocab_size=32000,
                       max_seq_len=4096,
                       moe={"num_routed_experts": 8, "num_null_experts": 0, "num_shared_experts": 0,
                            "shared_ffn_size": 0, "routed_ffn_size": 14336, "min_k": 2, "max_k": 2,
                            "top_p": 1.0})
    w = Workload(mcfg, global_batch=256, micro_batch=1, seq_len=4096, precision="bf16", zero_stage=1,
                 sequence_parallel=True, overlap_comm=True)
    lay = Layout(tp=1, ep=8, dp=16, pp=4, vpp=8)
    a = Assumptions(overlap_param_gather=True)
    t = step_time(w, lay, GPUS["H100-80G"], a)
    published = 468.0
    return {"gpus": lay.world, "layout": vars(lay), "gpu": "H100-80G", "assumptions": {
                "matmul_efficiency": a.matmul_efficiency, "link_efficiency": a.link_efficiency,
                "hbm_efficiency": a.hbm_efficiency, "elementwise_passes": a.elementwise_passes},
            "step_s": t["step_s"], "parts_s": {k: t[k] for k in ("compute", "elementwise", "ep_comm",
                                                                  "pp_bubble", "dp_exposed", "optimizer")},
            "predicted_tflops_per_gpu": t["tflops_per_gpu"], "published_tflops_per_gpu": published,
            "predicted_over_published": t["tflops_per_gpu"] / published}
