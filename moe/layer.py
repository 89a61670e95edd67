"""The Dynamic-Capacity MoE feed-forward layer: route -> permute -> grouped experts -> unpermute.

    layer = MoELayer(cfg, ep_group=None)   # ep_group: a DeepSpeed expert-parallel group, or None (local)
    out, aux = layer(x, task_ids=None)     # x [..., D]; task_ids [...] long (-1 = ignore) or None
    layer(x, task_ids, token_group=g)      # sequence parallel: x is this rank's share of the tokens of g

Parameters: "gate.weight" [R + Z + S, D] (fp32 compute), routed experts "experts.<GLOBAL id>.*" (this
rank's share of the EP group), shared experts "shared.<i>.*". Null experts have no parameters: they are
routing columns whose output is zero, never computed and never sent. The forward is a plain function of
x (and task_ids), so activation checkpointing can recompute it.

One host sync per forward: the per-expert pair counts (with EP, together with the counts the other ranks
send), which size the permutation and the all-to-all splits. Routing stats (`aux.stats`) copy to the host
only when read. How DeepSpeed treats this layer (gradient groups, checkpoint files): moe/deepspeed_compat.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn

from moe import deepspeed_compat
from moe.config import MoEConfig
from moe.dispatch import all_to_all, exchange_counts, permute, segment_perm, unpermute
from moe.experts import SwiGLU, expert_weights, grouped_swiglu, swiglu
from moe.losses import router_losses
from moe.router import gate_logits, route
from moe.seeding import derive_seed, keyed_normal_, keyed_uniform
from moe.stats import routing_stats


@dataclass
class MoEAux:
    balance_loss: torch.Tensor  # unweighted fp32 scalars
    z_loss: torch.Tensor
    entropy_loss: torch.Tensor
    selected: torch.Tensor  # bool [T, R + Z] raw routing decisions (detached), T = flattened tokens
    probs: torch.Tensor  # fp32 [T, R + Z] dynamic softmax (detached)
    task_ids: torch.Tensor | None  # long [T] or None
    num_routed: int
    collapse_threshold: float

    @functools.cached_property
    def stats(self) -> dict:
        """Detached routing stats (python numbers), overall and "per_task"; computed on first access."""
        return routing_stats(self.selected, self.probs, self.task_ids, self.num_routed,
                             self.collapse_threshold)


class MoELayer(_DeepSpeedMoE):
    def __init__(self, cfg: MoEConfig, ep_group=None):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ builds its own gate/experts: not wanted
        self.cfg = cfg
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if cfg.num_routed_experts % self.ep_size:
            raise ValueError(f"MoEConfig.num_routed_experts={cfg.num_routed_experts} must be divisible by "
                             f"the expert-parallel size {self.ep_size}")
        # attributes DeepSpeed's engine reads from an MoE layer
        self.num_experts = cfg.num_routed_experts
        self.num_local_experts = cfg.num_routed_experts // self.ep_size
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.first_expert = self.ep_rank * self.num_local_experts

        self.gate = nn.Linear(cfg.hidden_size, cfg.num_gate_outputs, bias=False)
        self.experts = nn.ModuleDict({
            str(g): SwiGLU(cfg.hidden_size, cfg.routed_ffn_size)
            for g in range(self.first_expert, self.first_expert + self.num_local_experts)})
        self.shared = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.shared_ffn_size)
                                    for _ in range(cfg.num_shared_experts))
        for p in self.experts.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name
        # router jitter: set per training step (set_jitter_seed); None = drawn from the torch RNG
        self.jitter_seed: int | None = None
        self.reset_parameters(int(torch.randint(0, 2**62, (), device="cpu")), layer=0)
        self.register_state_dict_post_hook(MoELayer._state_dict_hook)
        self.register_load_state_dict_pre_hook(MoELayer._load_hook)

    def reset_parameters(self, seed: int, layer: int) -> None:
        """N(0, init_std^2) weights, each module from its own seed: the gate from (seed, layer, "gate"),
        shared expert i from (seed, layer, "shared", i), routed expert g from (seed, layer, "expert", g with
        g its GLOBAL id): the same weights at every expert-parallel size."""
        if self.gate.weight.is_meta:  # built for its shapes only
            return
        std = self.cfg.init_std
        keyed_normal_(self.gate.weight, std, seed, layer, "gate")
        for i, shared in enumerate(self.shared):
            self._init_swiglu(shared, seed, layer, "shared", i)
        for g, expert in self.experts.items():
            self._init_swiglu(expert, seed, layer, "expert", int(g))

    def _init_swiglu(self, module: SwiGLU, *key) -> None:
        gen = torch.Generator().manual_seed(derive_seed(*key))
        with torch.no_grad():
            for w in (module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight):
                w.copy_(torch.empty(w.shape).normal_(0.0, self.cfg.init_std, generator=gen))

    @property
    def local_experts(self) -> list[SwiGLU]:
        first = self.first_expert
        return [self.experts[str(g)] for g in range(first, first + self.num_local_experts)]

    # DeepSpeed hooks --------------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by deepspeed.initialize: make sure DeepSpeed's group for our EP size is ours."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        if self.ep_group is not None:
            theirs = dist.get_process_group_ranks(groups._get_expert_parallel_group(self.expert_group_name))
            ours = dist.get_process_group_ranks(self.ep_group)
            if sorted(theirs) != sorted(ours):
                raise ValueError(f"MoELayer ep_group ranks {ours} differ from DeepSpeed's "
                                 f"'{self.expert_group_name}' group {theirs}: pass "
                                 f"deepspeed.utils.groups._get_expert_parallel_group('{self.expert_group_name}')")

    @staticmethod
    def _state_dict_hook(module, state_dict, prefix, local_metadata):
        if deepspeed_compat.native_view_active():
            deepspeed_compat.to_native_keys(state_dict, prefix, module.first_expert)

    @staticmethod
    def _load_hook(module, state_dict, prefix, *args):
        deepspeed_compat.from_native_keys(state_dict, prefix, module.first_expert)

    # forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None, token_group=None,
                token_keys: torch.Tensor | None = None):
        cfg = self.cfg
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if task_ids is not None:
            task_ids = task_ids.reshape(-1)
            if task_ids.numel() != x_TD.shape[0]:
                raise ValueError(f"MoELayer: task_ids has {task_ids.numel()} entries for {x_TD.shape[0]} "
                                 f"tokens (it must have x's leading shape {tuple(shape[:-1])})")
        # 1. route: fp32 gate, Top-P over routed + null, combine weights
        logits = gate_logits(x_TD, self.gate.weight, cfg.input_jitter if self.training else 0.0,
                             self._jitter_noise(x_TD, token_keys))
        r = route(logits, cfg)
        valid = None if task_ids is None else task_ids >= 0
        balance, z, entropy = router_losses(logits, r.probs, r.selected, cfg.num_dynamic_experts, valid,
                                            token_group)
        # 2. shared experts, always on: the output the routed experts are added onto
        out = self._shared_experts(x_TD, r.shared_weights)
        # 3. permute -> grouped experts -> unpermute; the combine weights are applied here, at home
        selected_TR = r.selected[:, : cfg.num_routed_experts]
        if self.ep_group is None:
            y_MD, token_ids, expert_ids = self._routed_local(x_TD, selected_TR)
        else:
            y_MD, token_ids, expert_ids = self._routed_expert_parallel(x_TD, selected_TR)
        w_M = r.weights.reshape(-1).index_select(0, token_ids * cfg.num_dynamic_experts + expert_ids)
        out = unpermute(out, y_MD, token_ids, w_M)

        aux = MoEAux(balance_loss=balance, z_loss=z, entropy_loss=entropy, selected=r.selected.detach(),
                     probs=r.probs.detach(), task_ids=task_ids, num_routed=cfg.num_routed_experts,
                     collapse_threshold=cfg.collapse_entropy_threshold)
        return out.reshape(shape), aux

    def _jitter_noise(self, x_TD: torch.Tensor, token_keys: torch.Tensor | None) -> torch.Tensor | None:
        """U[0, 1) [T, D] keyed by (jitter_seed, token key, channel) when both are known (training: the
        noise of a token is the same at every layout), else None (gate_logits draws from the torch RNG)."""
        if not self.training or self.cfg.input_jitter <= 0 or self.jitter_seed is None or token_keys is None:
            return None
        return keyed_uniform(token_keys.reshape(-1), x_TD.shape[-1], self.jitter_seed)

    def _shared_experts(self, x_TD: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """sum_s g_s * shared_s(x): the shared experts side by side along F, one SwiGLU."""
        if not len(self.shared):
            return torch.zeros_like(x_TD)
        w_gate, w_up, w_down = expert_weights(self.shared)
        return swiglu(x_TD, torch.cat(w_gate), torch.cat(w_up), torch.cat(w_down, dim=1), gates)

    def _routed_local(self, x_TD: torch.Tensor, selected_TR: torch.Tensor):
        """All routed experts on this rank -> (outputs [M, D] of the pairs sorted by expert, token ids,
        expert ids)."""
        counts = selected_TR.sum(0)
        host_counts = counts.tolist()  # the host sync
        token_ids, expert_ids = permute(selected_TR, sum(host_counts))
        y_MD = grouped_swiglu(x_TD.index_select(0, token_ids), host_counts, counts.cumsum(0).to(torch.int32),
                              *expert_weights(self.local_experts))
        return y_MD, token_ids, expert_ids

    def _routed_expert_parallel(self, x_TD: torch.Tensor, selected_TR: torch.Tensor):
        """Rank r holds global experts [r * L, (r + 1) * L); the same result as `_routed_local`."""
        n, L, group = self.ep_size, self.num_local_experts, self.ep_group
        # 1. counts first: recv[s * L + l] = rank s's pairs for my local expert l
        counts = selected_TR.sum(0)
        recv = exchange_counts(counts, group)
        host = torch.cat([counts, recv]).tolist()  # the host sync
        send_c, recv_c = host[: n * L], host[n * L:]
        send_splits = [sum(send_c[r * L: (r + 1) * L]) for r in range(n)]
        recv_splits = [sum(recv_c[s * L: (s + 1) * L]) for s in range(n)]
        local_counts = [sum(recv_c[s * L + e] for s in range(n)) for e in range(L)]
        # 2. permute: sorted by global expert, the pairs are grouped by destination rank
        token_ids, expert_ids = permute(selected_TR, sum(send_c))
        # 3. the tokens travel; the rows received (by source rank) are run by local expert
        x_recv = all_to_all(x_TD.index_select(0, token_ids), send_splits, recv_splits, group)
        perm = segment_perm(recv.view(n, L), sum(recv_splits))
        offs = recv.view(n, L).sum(0).cumsum(0).to(torch.int32)
        y = grouped_swiglu(x_recv.index_select(0, perm), local_counts, offs,
                           *expert_weights(self.local_experts))
        # 4. back in the order received, and home
        y_recv = torch.empty_like(y).index_copy_(0, perm, y)
        return all_to_all(y_recv, recv_splits, send_splits, group), token_ids, expert_ids


def set_jitter_seed(model: nn.Module, seed: int, step: int) -> None:
    """Before a training step: the router jitter of the i-th MoELayer of `model` becomes a function of
    (seed, step, i) and of each token's key (MoELayer.forward's token_keys), not of any rank's RNG."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for i, layer in enumerate(layers):
        layer.jitter_seed = derive_seed(seed, step, i, "router jitter")
