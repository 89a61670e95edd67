"""Decoder-only audio-token language model (plain torch; tensor parallelism is applied from outside).

Architecture: RMSNorm, rotary position embeddings, causal SDPA attention, per layer a dense SwiGLU FFN
or the Dynamic-Capacity MoE layer of moe/. Input sequence per sample:
    <task> text ids <sep> frame_0 .. frame_{S-2}      (frames in the delay layout, training/model/delay.py)
A text position embeds its sentencepiece id; an audio position embeds the SUM of its K codebook
embeddings. K output heads predict the next frame's K codes; the loss covers audio targets only.
Shapes: B batch, L sequence, K codebooks, V (padded) codebook vocab, D hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe.experts import SwiGLU
from training.model.delay import DelayPattern

TASKS = ("speech", "music")  # task index = position in this tuple (also the MoE task id)
IGNORE_INDEX = -100
RECOMPUTE = ("none", "block", "moe")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int | None = None     # dense SwiGLU width; default 8/3 * hidden rounded up to 64
    num_codebooks: int = 8
    codebook_size: int = 1024
    delay_pattern: str | list[int] = "paper"  # "paper" [0,8,9,..], "musicgen" [0,1,..], "none" or a list
    text_vocab_size: int = 1024            # the sentencepiece model's vocab size
    vocab_pad_multiple: int = 64           # text and codebook vocabs are padded (tensor-parallel shards)
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    codebook_loss: str = "sum"             # "sum" over codebooks (paper) or "mean"
    # MoE: `moe` holds moe.config.MoEConfig (or its keyword arguments; hidden_size is taken from the
    # model); None = dense model. Missing routed_ffn_size / shared_ffn_size default to
    # ffn_hidden_size / 4 and / 8 (the paper's widths). moe_layers: which layers get the MoE FFN
    # ("all", "every_other", "none" or a list of indices); ignored when moe is None.
    moe: Any = None
    moe_layers: str | list[int] = "all"
    num_kv_heads: int | None = None        # grouped-query attention; None = num_heads
    # activation recomputation in training (torch.utils.checkpoint, non-reentrant): "none"; "block" keeps
    # only each block's input and recomputes the block in backward; "moe" recomputes the MoE FFNs only
    # (norm + router + dispatch + experts: the largest activations). With expert parallelism the
    # recomputation runs the MoE layer's all-to-all exchange again (every rank recomputes the same layer
    # at the same point of its backward, so the exchanges pair up); RNG state (router jitter) is restored.
    recompute: str = "none"

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")
        for name in ("num_layers", "hidden_size", "num_heads", "num_codebooks", "codebook_size",
                     "text_vocab_size", "vocab_pad_multiple", "max_seq_len"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        need(self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even (rotary embeddings)")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = _round_up(int(8 * self.hidden_size / 3), 64)
        need(self.ffn_hidden_size >= 1, f"ffn_hidden_size must be >= 1, got {self.ffn_hidden_size}")
        need(self.codebook_loss in ("sum", "mean"), f"codebook_loss must be 'sum' or 'mean', "
             f"got {self.codebook_loss!r}")
        need(self.recompute in RECOMPUTE, f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        self.delays()  # validates delay_pattern against num_codebooks
        ids = self.moe_layer_ids
        need(all(0 <= i < self.num_layers for i in ids),
             f"moe_layers {self.moe_layers} has indices outside [0, {self.num_layers})")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        need(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        need(self.moe is None or isinstance(self.moe, dict) or is_dataclass(self.moe),
             f"moe must be None, a moe.config.MoEConfig or a dict of its arguments, got {type(self.moe)}")
        if self.moe is not None:
            hs = self.moe_kwargs()["hidden_size"]
            need(hs == self.hidden_size, f"moe.hidden_size {hs} != hidden_size {self.hidden_size}")
            try:
                self.moe_config()  # MoEConfig validates its own fields
            except TypeError as e:
                raise ValueError(f"ModelConfig.moe: {e} (fields: see moe/config.py MoEConfig)") from e

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def moe_layer_ids(self) -> list[int]:
        if self.moe is None:
            return []
        spec = self.moe_layers
        if isinstance(spec, str):
            table = {"none": [], "all": list(range(self.num_layers)),
                     "every_other": list(range(1, self.num_layers, 2))}
            if spec not in table:
                raise ValueError(f"ModelConfig: moe_layers {spec!r}: use one of {sorted(table)} or a list")
            return table[spec]
        return sorted({int(i) for i in spec})

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layer_ids)

    @property
    def audio_vocab_size(self) -> int:  # codes + EOS/PAD/BOS
        return self.delays().vocab_size

    @property
    def padded_audio_vocab_size(self) -> int:
        return _round_up(self.audio_vocab_size, self.vocab_pad_multiple)

    @property
    def padded_text_vocab_size(self) -> int:
        return _round_up(self.text_vocab_size, self.vocab_pad_multiple)

    def delays(self) -> DelayPattern:
        return DelayPattern.build(self.delay_pattern, self.num_codebooks, self.codebook_size)

    def moe_kwargs(self) -> dict:
        kw = {"hidden_size": self.hidden_size, "routed_ffn_size": self.ffn_hidden_size // 4,
              "shared_ffn_size": self.ffn_hidden_size // 8}
        kw.update(asdict(self.moe) if is_dataclass(self.moe) else dict(self.moe or {}))
        return kw

    def moe_config(self):
        if is_dataclass(self.moe):
            return self.moe
        from moe.config import MoEConfig
        return MoEConfig(**self.moe_kwargs())


@dataclass
class ModelOutput:
    loss: torch.Tensor | None                  # LM loss on audio targets (sum or mean over codebooks)
    loss_per_codebook: torch.Tensor | None     # [K], mean over that codebook's targets
    loss_per_task: dict[str, torch.Tensor]     # every task; 0 for a task absent from the batch
    aux: list                                  # one moe aux per MoE layer (empty for dense)
    logits: torch.Tensor                       # [B, L, K, V]; vocab-local shard under tensor parallelism
    token_loss_sum: torch.Tensor | None = None  # [B, K] summed token losses per sample and codebook
    token_count: torch.Tensor | None = None     # [B, K] their target counts (training.stages.StepTokens)
    task_present: torch.Tensor | None = None   # [len(TASKS)] 1.0 where the task has a sample (on device:
                                               # no host sync to know it)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float):
    """positions [B, L] -> (cos, sin) [B, 1, L, Dh/2] in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    ang = positions.float()[..., None] * inv_freq
    return ang.cos()[:, None], ang.sin()[:, None]


def apply_rope(x, cos, sin):
    """x [B, H, L, Dh]: rotate the (first half, second half) pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache:
    """Keys/values per layer, grown by concatenation along the sequence ([B, H, L, Dh])."""

    def __init__(self, num_layers: int):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def update(self, layer: int, k, v):
        if self.kv[layer] is not None:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


class LocalRegions:
    """The borders of the tensor-parallel regions when one rank holds the whole model: identities.
    training.model.parallel_regions.TensorParallelRegions is the TP (and sequence-parallel) version:
    scatter after the embeddings, enter before column-parallel layers, exit after row-parallel ones,
    replicated to run a module whose replicated parameters (norms, MoE layers) see this rank's tokens."""

    token_group = None  # process group over which the MoE layers' tokens are split (None: not split)

    def begin(self, batch: int, length: int, cache=None) -> LocalRegions:
        return self

    def scatter(self, x):
        return x

    def scatter_ids(self, ids):
        return ids

    def enter(self, x):
        return x

    def exit(self, y):
        return y

    def replicated(self, module, *args, **kwargs):
        return module(*args, **kwargs)


LOCAL = LocalRegions()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.num_heads // cfg.num_kv_heads
        # qkv rows are [q (H*Dh); k (Hkv*Dh); v (Hkv*Dh)]; tensor parallelism shards each part by heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, regions=LOCAL):
        B, L = cos.shape[0], cos.shape[2]  # x may be this rank's share of the tokens (sequence parallel)
        qkv = self.qkv_proj(regions.enter(x))  # local heads under TP
        kv_width = qkv.shape[-1] // (self.q_per_kv + 2)
        q, k, v = qkv.split([qkv.shape[-1] - 2 * kv_width, kv_width, kv_width], dim=-1)
        q, k, v = (t.view(B, L, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.q_per_kv > 1:
            k, v = (t.repeat_interleave(self.q_per_kv, dim=1) for t in (k, v))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return regions.exit(self.o_proj(y.transpose(1, 2).reshape(B, L, -1)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ep_group=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = layer_idx in cfg.moe_layer_ids
        if self.is_moe:
            from moe.layer import MoELayer
            self.ffn = MoELayer(cfg.moe_config(), ep_group=ep_group)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)  # same names as the routed experts
        self.recompute_moe = self.is_moe and cfg.recompute == "moe"

    def forward(self, x, cos, sin, mask=None, cache=None, task_ids=None, regions=LOCAL, token_keys=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, regions)
        if not self.is_moe:
            return x + regions.exit(self.ffn(regions.enter(self.ffn_norm(x)))), None
        if self.recompute_moe and self.training and torch.is_grad_enabled():
            h, aux = checkpoint(self._moe, x, task_ids, regions.token_group, token_keys, use_reentrant=False)
        else:
            h, aux = self._moe(x, task_ids, regions.token_group, token_keys)
        return x + h, aux

    def _moe(self, x, task_ids, token_group, token_keys=None):
        return self.ffn(self.ffn_norm(x), task_ids, token_group=token_group, token_keys=token_keys)


def cross_entropy_per_token(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [..., V], target [...] (IGNORE_INDEX allowed) -> loss [...] (0 where ignored)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(target.shape)


class AudioLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_group=None):
        super().__init__()
        init_seed = int(torch.randint(0, 2**62, (), device="cpu"))  # the one draw from the torch RNG
        self.cfg = cfg
        D = cfg.hidden_size
        self.text_embed = nn.Embedding(cfg.padded_text_vocab_size, D)
        self.audio_embed = nn.ModuleList(nn.Embedding(cfg.audio_vocab_size, D)
                                         for _ in range(cfg.num_codebooks))
        self.layers = nn.ModuleList(Block(cfg, i, ep_group) for i in range(cfg.num_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(D, cfg.padded_audio_vocab_size, bias=False)
                                   for _ in range(cfg.num_codebooks))
        # swapped for megatron-core's vocab-parallel cross entropy and the TP borders by
        # training.model.tensor_parallel
        self.cross_entropy = cross_entropy_per_token
        self.regions = LOCAL
        self._init_weights(init_seed)

    def _init_weights(self, seed: int):
        """Every weight a function of `seed` alone (drawn from the torch RNG when the model is built), not
        of the layout: the non-MoE weights in order from one generator, each MoE layer's gate and experts
        from their own keys (MoELayer.reset_parameters: routed experts by global id)."""
        if self.text_embed.weight.is_meta:  # built for its shapes only (torch.device("meta"))
            return
        std = self.cfg.init_std
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.startswith("layers.") and ".ffn." in name and self.layers[int(name.split(".")[1])].is_moe:
                continue  # the MoE layer initialises its own experts and gate
            if p.dim() == 1:
                continue  # norm weights stay 1
            # residual-branch outputs scaled down with depth (GPT-2 / nanoGPT)
            scale = 1 / math.sqrt(2 * self.cfg.num_layers) if name.endswith(("o_proj.weight",
                                                                               "down_proj.weight")) else 1.0
            with torch.no_grad():
                p.copy_(torch.empty(p.shape).normal_(0.0, std * scale, generator=gen))
        for i, block in enumerate(self.layers):
            if block.is_moe:
                block.ffn.reset_parameters(seed, layer=i)

    def embed(self, text: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        """text [B, L], audio [B, K, L], audio_mask [B, L] -> [B, L, D]."""
        x_text = self.text_embed(text)
        x_audio = sum(emb(audio[:, k]) for k, emb in enumerate(self.audio_embed))
        return torch.where(audio_mask[..., None], x_audio, x_text)

    def forward_logits(self, text, audio, audio_mask, *, positions=None, valid=None, cache=None,
                       task_ids=None, token_keys=None):
        """Run the transformer on a chunk -> (logits [B, L, K, V], list of MoE aux).

        positions [B, L] (default: cache length + 0..L-1); valid [B, L_total] bool marks real
        (non-padding) key positions of everything seen so far incl. this chunk: needed when prompts
        are left-padded (generation). Without it attention is plain causal.
        """
        B, L = text.shape
        past = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(past, past + L, device=text.device).expand(B, L)
        mask = None
        if valid is None and past > 0 and L > 1:
            # SDPA's is_causal is top-left aligned when queries and keys differ in length: a chunk
            # after cached positions needs the explicit (bottom-right aligned) mask
            valid = torch.ones(B, past + L, dtype=torch.bool, device=text.device)
        if valid is not None:
            q_pos = torch.arange(past, past + L, device=text.device)
            k_pos = torch.arange(past + L, device=text.device)
            causal = k_pos[None, :] <= q_pos[:, None]  # [L, past+L]
            mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, L, past+L]
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: avoid NaN
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        regions = self.regions.begin(B, L, cache)
        x = regions.scatter(self.embed(text, audio, audio_mask))
        task_ids = regions.scatter_ids(task_ids)
        token_keys = regions.scatter_ids(token_keys)
        recompute = (self.cfg.recompute == "block" and self.training and torch.is_grad_enabled()
                     and cache is None)
        aux = []
        for layer in self.layers:
            if recompute:
                x, a = checkpoint(regions.replicated, layer, x, cos, sin, mask, None, task_ids, regions,
                                  token_keys, use_reentrant=False)
            else:
                x, a = regions.replicated(layer, x, cos, sin, mask, cache, task_ids, regions, token_keys)
            if a is not None:
                aux.append(a)
        x = regions.enter(regions.replicated(self.norm, x))
        logits = torch.stack([head(x) for head in self.heads], dim=2)
        return logits, aux

    def forward(self, batch: dict) -> ModelOutput:
        """batch from training.model.batch.collate: text, audio, audio_mask, labels, task_ids, task."""
        logits, aux = self.forward_logits(batch["text"], batch["audio"], batch["audio_mask"],
                                          task_ids=batch.get("task_ids"), token_keys=batch.get("token_keys"))
        if "labels" not in batch:
            return ModelOutput(None, None, {}, aux, logits)
        labels = batch["labels"]  # [B, K, L]
        K = self.cfg.num_codebooks
        tok_loss = torch.stack([self.cross_entropy(logits[:, :, k], labels[:, k])
                                for k in range(K)], dim=1)  # [B, K, L]
        valid = (labels != IGNORE_INDEX).float()
        tok_loss = tok_loss * valid

        def reduce(sample_mask):
            num = (tok_loss * sample_mask[:, None, None]).sum(dim=(0, 2))
            den = (valid * sample_mask[:, None, None]).sum(dim=(0, 2)).clamp(min=1)
            per_cb = num / den
            return per_cb, per_cb.sum() if self.cfg.codebook_loss == "sum" else per_cb.mean()

        per_cb, loss = reduce(torch.ones(labels.shape[0], device=labels.device))
        sel = (batch["task"][None, :] == torch.arange(len(TASKS), device=labels.device)[:, None]).float()
        per_task = {name: reduce(sel[t])[1] for t, name in enumerate(TASKS)}
        return ModelOutput(loss, per_cb, per_task, aux, logits, token_loss_sum=tok_loss.sum(2),
                           token_count=valid.sum(2), task_present=sel.amax(dim=1))
