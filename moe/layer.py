"""The Dynamic-Capacity MoE feed-forward layer (Top-P routing over routed + null experts, shared experts).

    layer = MoELayer(cfg, ep_group=None)   # ep_group: a DeepSpeed expert-parallel group or None (EP=1)
    out, aux = layer(x, task_ids=None)     # x [..., D]; task_ids [...] long (-1 = ignore) or None
    layer(x, task_ids, token_group=g)      # sequence parallel: x is this rank's share of the tokens of g

Parameters: "gate.weight" [R + Z + S, D] (fp32 compute), routed experts "experts.<GLOBAL id>.*" (this
rank's share of the EP group), shared experts "shared.<i>.*". Null experts have no parameters: they are
routing columns whose output is zero, never computed and never sent. Dispatch is dropless (moe.dispatch).
How DeepSpeed treats this layer (gradient groups, checkpoint files): see moe/deepspeed_compat.py.
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
from moe.dispatch import (
    Plan,
    exchange,
    exchange_counts,
    gather,
    resolve_exchange,
    scatter_add,
    segment_perm,
)
from moe.experts import SwiGLU, grouped_swiglu, swiglu
from moe.losses import router_losses
from moe.router import gate_logits, route
from moe.serial import one_thread, serial
from moe.stats import routing_stats


@dataclass
class MoEAux:
    balance_loss: torch.Tensor  # unweighted fp32 scalars
    z_loss: torch.Tensor
    entropy_loss: torch.Tensor
    selected: torch.Tensor  # bool [N, R + Z] raw routing decisions (detached), N = flattened tokens
    probs: torch.Tensor  # fp32 [N, R + Z] dynamic softmax (detached)
    task_ids: torch.Tensor | None  # long [N] or None
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
        self.reset_parameters()
        deepspeed_compat.install()
        self.register_state_dict_post_hook(MoELayer._state_dict_hook)
        self.register_load_state_dict_pre_hook(MoELayer._load_hook)

    def reset_parameters(self):
        for p in self.parameters():
            nn.init.normal_(p, std=self.cfg.init_std)

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
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None, token_group=None):
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tok = x.shape[0]
        if task_ids is not None:
            task_ids = task_ids.reshape(-1)
            if task_ids.numel() != n_tok:
                raise ValueError(f"MoELayer: task_ids has {task_ids.numel()} entries for {n_tok} tokens "
                                 f"(it must have x's leading shape {tuple(shape[:-1])})")
        # fp32 gate (and fp32 jitter: 1 +- 0.01 is not representable in bf16)
        logits = gate_logits(x.float(), self.gate.weight.float(), cfg.input_jitter if self.training else 0.0)
        valid = None if task_ids is None else task_ids >= 0

        def _route(lg):  # small [N, R+Z+S] ops: one CPU thread (moe.serial)
            r = route(lg, cfg)
            losses = router_losses(lg, r.probs, r.selected, cfg.num_dynamic_experts, valid, token_group)
            shared = lg.new_zeros(0) if r.shared_weights is None else r.shared_weights
            return (r.selected, r.weights, shared, r.probs, *losses)

        selected, weights, shared_w, probs, balance, z, ent = serial(_route, logits)
        with one_thread():
            plan = Plan(selected, cfg.num_routed_experts)
            pair_idx = plan.expert_ids * n_tok + plan.token_ids
        # combine weight of each pair, expert-major like the pairs: a 1-D gather from weights.T
        (w,) = serial(lambda wt: (wt.t().reshape(-1).index_select(0, pair_idx),), weights)
        shared_out = None
        if len(self.shared):
            shared_out = self._shared_forward(x, shared_w if shared_w.numel() else None)
        # routed outputs, each times its combine weight, are added onto the shared experts' output
        if self.ep_size == 1:  # gather, experts and scatter-add fused, piece by piece
            out = grouped_swiglu(x, plan.counts.tolist(), self.local_experts, index=plan.token_ids,
                                 row_weights=w, base=shared_out)
        else:
            y_sorted = self._expert_parallel(gather(x, plan), w, plan.counts)
            out = scatter_add(y_sorted, plan, base=shared_out)

        aux = MoEAux(balance_loss=balance, z_loss=z, entropy_loss=ent, selected=selected.detach(),
                     probs=probs.detach(), task_ids=task_ids, num_routed=cfg.num_routed_experts,
                     collapse_threshold=cfg.collapse_entropy_threshold)
        return out.reshape(shape), aux

    def _shared_forward(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """sum_s g_s * shared_s(x) as ONE wide SwiGLU: weights concatenated, gate g_s applied to the
        activations of expert s's block (down is linear, so scaling before it is the same)."""
        gate_w = [e.gate_proj.weight for e in self.shared]
        up_w = [e.up_proj.weight for e in self.shared]
        down_w = [e.down_proj.weight for e in self.shared]
        if len(self.shared) == 1:
            return swiglu(x, gate_w[0], up_w[0], down_w[0], block_gates=gates)
        return swiglu(x, torch.cat(gate_w), torch.cat(up_w), torch.cat(down_w, dim=1), block_gates=gates)

    def _expert_parallel(self, x_sorted: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send each (token, expert) row and its combine weight to the rank holding the expert, run,
        bring the weighted results back."""
        n, n_local = self.ep_size, self.num_local_experts
        method = resolve_exchange(self.cfg.ep_exchange, self.ep_group)
        recv = exchange_counts(counts, self.ep_group, method)  # [n * L]: from rank s for my expert l
        host = torch.cat([counts, recv]).tolist()
        send_c, recv_c = host[: n * n_local], host[n * n_local:]
        send_splits = [sum(send_c[r * n_local: (r + 1) * n_local]) for r in range(n)]
        recv_splits = [sum(recv_c[s * n_local: (s + 1) * n_local]) for s in range(n)]
        local_counts = [sum(recv_c[s * n_local + e] for s in range(n)) for e in range(n_local)]

        x_recv = exchange(x_sorted, send_splits, recv_splits, self.ep_group, method)
        w_recv = exchange(w.unsqueeze(1), send_splits, recv_splits, self.ep_group, method)
        perm = segment_perm(recv.view(n, n_local))  # (source, expert) order -> (expert, source) order
        # pair p of my experts reads received row perm[p] and writes its output back to that row
        y_recv = grouped_swiglu(x_recv, local_counts, self.local_experts, index=perm,
                                row_weights=w_recv.squeeze(1).index_select(0, perm))
        return exchange(y_recv, recv_splits, send_splits, self.ep_group, method)
