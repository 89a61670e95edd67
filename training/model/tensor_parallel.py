"""Megatron-style tensor parallelism applied to a plain AudioLM from outside (torchtitan style).

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)      # training/cluster/parallel.py does this
    model = AudioLM(cfg, ep_group=...)     # same seed on every rank: identical full weights
    parallelize(model, sequence_parallel=True)   # megatron-core layers holding this rank's shards

Sharding (rank r of tp, a shard = the r-th contiguous block of the split dimension):
    attn.qkv_proj   ColumnParallelLinear   rows of q, of k and of v, each sharded by heads
    attn.o_proj     RowParallelLinear      columns (input features) by heads
    ffn.gate/up     ColumnParallelLinear   rows (FFN hidden), dense layers only
    ffn.down_proj   RowParallelLinear      columns
    text_embed      VocabParallelEmbedding rows (padded text vocab)
    heads.k         ColumnParallelLinear   rows (padded codebook vocab); logits stay vocab-sharded and
                                           the loss is megatron-core's vocab-parallel cross entropy
Everything else (norms, codebook embeddings, MoE layers) is replicated; experts are split over EP only.
Sharded weights carry megatron-core's `tensor_model_parallel` attribute, so DeepSpeed's gradient norm
(used for clipping and logged) counts every shard once and the replicated weights once.

The column/row layers do no communication of their own: the model calls the region borders of
training.model.parallel_regions around them. With sequence parallelism (the default for TP > 1) the
norms and MoE layers between the borders see 1/TP of the tokens, and their parameters' gradients are
summed over the TP group (one all-reduce per block) before DeepSpeed reduces them over data
parallelism. Without it (`sequence_parallel=False`) every TP rank runs the MoE layers on all tokens,
and the router jitter RNG is kept identical across the TP group.
`shard_state_dict` / `merge_state_dicts` convert between full and TP-sharded state dicts by the same
rules, `gather_full_state_dict` collects the full one from a running TP group (checkpoint export).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)

from training.model.lm import IGNORE_INDEX, AudioLM, ModelConfig
from training.model.parallel_regions import TensorParallelRegions

# (name regex, kind): kind "qkv" = rows split per q/k/v part, 0 = rows, 1 = columns
_RULES = [
    (re.compile(r"layers\.\d+\.attn\.qkv_proj\.weight$"), "qkv"),
    (re.compile(r"layers\.\d+\.attn\.o_proj\.weight$"), 1),
    (re.compile(r"layers\.\d+\.ffn\.(gate_proj|up_proj)\.weight$"), 0),
    (re.compile(r"layers\.\d+\.ffn\.down_proj\.weight$"), 1),
    (re.compile(r"text_embed\.weight$"), 0),
    (re.compile(r"heads\.\d+\.weight$"), 0),
]


def shard_kind(name: str):
    """How a parameter is split under TP: "qkv", 0 (rows), 1 (columns) or None (replicated)."""
    for pattern, kind in _RULES:
        if pattern.search(name):
            return kind
    return None


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]


def shard_tensor(full: torch.Tensor, kind, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    if kind is None:
        return full
    if kind == "qkv":
        return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(_qkv_sizes(cfg), dim=0)])
    return full.chunk(tp, dim=kind)[rank]


def merge_tensors(shards: list[torch.Tensor], kind, cfg: ModelConfig) -> torch.Tensor:
    if kind is None:
        return shards[0]
    if kind == "qkv":
        tp = len(shards)
        local = [s // tp for s in _qkv_sizes(cfg)]
        parts = [s.split(local, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
    return torch.cat(shards, dim=kind)


def shard_state_dict(full: dict, cfg: ModelConfig, rank: int, tp: int) -> dict:
    return {k: shard_tensor(v, shard_kind(k), cfg, rank, tp) for k, v in full.items()}


def merge_state_dicts(shards: list[dict], cfg: ModelConfig) -> dict:
    return {k: merge_tensors([s[k] for s in shards], shard_kind(k), cfg) for k in shards[0]}


def gather_full_state_dict(model: AudioLM, tp_group=None) -> dict:
    """The full (unsharded) state dict of a parallelized model, on every rank of its TP group."""
    tp_group = tp_group or ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    out = {}
    for name, t in model.state_dict().items():
        kind = shard_kind(name)
        if kind is None or tp == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        out[name] = merge_tensors(parts, kind, model.cfg)
    return out


def check_tp_size(cfg: ModelConfig, tp: int) -> None:
    """Raise a clear error when the model cannot be split over `tp` ranks."""
    for what, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("ffn_hidden_size", cfg.ffn_hidden_size),
                    ("padded text vocab (text_vocab_size rounded up to vocab_pad_multiple)",
                     cfg.padded_text_vocab_size),
                    ("padded codebook vocab (codebook_size + 3 rounded up to vocab_pad_multiple)",
                     cfg.padded_audio_vocab_size)):
        if n % tp:
            raise ValueError(f"tensor parallel size {tp} must divide model {what} = {n}")


class _Column(ColumnParallelLinear):
    """Built with disable_grad_reduce=True: the input's gradient is reduced by the region border."""
    # megatron's (empty, fp8-only) "_extra_state" entry is left out: state dicts keep the plain names
    get_extra_state, set_extra_state = torch.nn.Module.get_extra_state, torch.nn.Module.set_extra_state

    def forward(self, x):
        return super().forward(x)[0]


class _Row(RowParallelLinear):
    """Returns the partial sums; the region border all-reduces or reduce-scatters them (megatron-core's
    path for layers whose communication the caller does: explicit_expert_comm with skip_bias_add)."""
    get_extra_state, set_extra_state = torch.nn.Module.get_extra_state, torch.nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.explicit_expert_comm = True

    def forward(self, x):
        return super().forward(x)[0]


def _mark_tensor_parallel(weight: torch.Tensor, dim: int) -> None:
    """megatron-core's TP attributes (perform_initialization=False leaves them unset): DeepSpeed's
    is_model_parallel_parameter then counts this shard in the gradient norm on every TP rank."""
    if getattr(weight, "tensor_model_parallel", False):
        assert weight.partition_dim == dim, (weight.partition_dim, dim)
        return
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(weight, attr):
            delattr(weight, attr)
    set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def megatron_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    # CPU-safe settings (shared/ENVIRONMENT.md); on GPU the same flags work, weights are copied in anyway.
    # sequence_parallel stays False here: the region borders (parallel_regions) do the SP communication.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, gradient_accumulation_fusion=False,
                               sequence_parallel=False, params_dtype=dtype)


def _noinit(weight):
    return weight


def vocab_parallel_ce_per_token(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Like training.model.lm.cross_entropy_per_token on vocab-sharded logits. megatron-core's function
    overwrites its input, so it gets an fp32 copy (the model's logits stay intact)."""
    ignore = target == IGNORE_INDEX
    loss = vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), target.masked_fill(ignore, 0))
    return loss.masked_fill(ignore, 0.0)


def gather_vocab(logits: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather vocab-sharded logits [..., V/tp] -> [..., V] (evaluation, tests)."""
    group = group or ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def parallelize(model: AudioLM, tp_group=None, sequence_parallel: bool = True,
                defer_expert_grads: bool = False) -> AudioLM:
    """Replace the TP-able modules of `model` in place with megatron-core layers holding this rank's
    shard of their current (full) weights, and install the region borders. No-op for a TP group of 1.
    defer_expert_grads (sequence parallel, trainer with moe.deepspeed_compat.MoEEngine): the routed experts'
    gradients are left as each rank's share; `model.expert_grad_tp_group` tells the engine to sum them
    over TP once per step (moe/expert_grads.py)."""
    tp_group = tp_group or ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if tp == 1:
        return model
    cfg = model.cfg
    check_tp_size(cfg, tp)
    dtype = next(model.parameters()).dtype
    mcfg = megatron_config(tp, dtype)
    full = {k: v.detach() for k, v in model.state_dict().items()}

    def column(prefix, lin):
        new = _Column(lin.in_features, lin.out_features, config=mcfg, init_method=_noinit, bias=False,
                      gather_output=False, disable_grad_reduce=True, tp_group=tp_group)
        return _load(new, prefix, dim=0)

    def row(prefix, lin):
        new = _Row(lin.in_features, lin.out_features, config=mcfg, init_method=_noinit, bias=False,
                   input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)
        return _load(new, prefix, dim=1)

    def _load(new, prefix, dim):
        name = prefix + ".weight"
        new.to(full[name].device)  # megatron-core builds it on the CPU (use_cpu_initialization)
        with torch.no_grad():
            new.weight.copy_(shard_tensor(full[name], shard_kind(name), cfg, rank, tp))
        _mark_tensor_parallel(new.weight, dim)
        return new

    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        block.attn.qkv_proj = column(f"{p}.attn.qkv_proj", block.attn.qkv_proj)
        block.attn.o_proj = row(f"{p}.attn.o_proj", block.attn.o_proj)
        if not block.is_moe:
            block.ffn.gate_proj = column(f"{p}.ffn.gate_proj", block.ffn.gate_proj)
            block.ffn.up_proj = column(f"{p}.ffn.up_proj", block.ffn.up_proj)
            block.ffn.down_proj = row(f"{p}.ffn.down_proj", block.ffn.down_proj)
    emb = VocabParallelEmbedding(cfg.padded_text_vocab_size, cfg.hidden_size, init_method=_noinit,
                                 config=mcfg, tp_group=tp_group)
    model.text_embed = _load(emb, "text_embed", dim=0)
    for k in range(cfg.num_codebooks):
        model.heads[k] = column(f"heads.{k}", model.heads[k])
    model.cross_entropy = vocab_parallel_ce_per_token
    model.tp_size = tp
    defer = defer_expert_grads and sequence_parallel and cfg.is_moe
    model.regions = TensorParallelRegions(tp_group, sequence_parallel, defer_expert_grads=defer)
    model.expert_grad_tp_group = tp_group if defer else None
    if cfg.is_moe and not sequence_parallel:
        model.register_forward_pre_hook(functools.partial(_sync_rng_across_tp, group=tp_group))
    return model


def _sync_rng_across_tp(module, args, group):
    """Replicated MoE layers draw router jitter from the torch RNG: every TP rank must draw the same
    noise or their 'replicated' activations (and routing) silently diverge. Trainers commonly seed
    per rank, so before each training forward the TP group adopts TP rank 0's RNG state (a few KB)."""
    if not module.training:
        return
    src = dist.get_global_rank(group, 0)
    nccl = dist.get_backend(group) == "nccl"
    comm_dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    pairs = [(torch.get_rng_state, torch.set_rng_state)]
    if torch.cuda.is_available():
        pairs.append((torch.cuda.get_rng_state, torch.cuda.set_rng_state))
    for get, set_ in pairs:
        state = get().to(comm_dev)
        dist.broadcast(state, src=src, group=group)
        set_(state.cpu())
