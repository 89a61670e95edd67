"""How DeepSpeed (0.19) sees our MoE layer, and what its checkpoints contain for our experts.

Mechanism
---------
`moe.layer.MoELayer` subclasses `deepspeed.moe.layer.MoE` (it runs only `nn.Module.__init__`, none of
DeepSpeed's gate/expert construction) and sets the attributes the engine reads: `num_experts` (routed),
`ep_size`, `num_local_experts`, `expert_group_name` ("ep_size_<N>") and `set_deepspeed_parallelism()`.
Because the engine finds it with `isinstance(module, MoE)`:
  * `engine.has_moe_layers` is True, so ZeRO-1/2 (`stage_1_and_2._configure_moe_settings`) puts the
    optimizer param groups marked `moe` (from `split_params_into_different_moe_groups_for_optimizer`)
    on the expert-data-parallel group: expert gradients are reduced (and partitioned) only among the
    ranks that hold the same experts, divided by the full data-parallel size like DeepSpeed's own MoE,
    and never averaged with another rank's different experts. Without ZeRO the engine's
    `_reduce_expert_gradients` does the same.
  * Expert parameters carry `param.allreduce = False` and `param.group_name = "ep_size_<N>"`
    (`deepspeed.moe.utils.is_moe_param`), and the engine broadcasts them at start only inside their
    expert-data-parallel group.
  * The EP group must be DeepSpeed's: build it with `deepspeed.utils.groups._create_expert_and_data_
    parallel(ep_size)` (or let the engine create it) and pass `groups._get_expert_parallel_group(
    "ep_size_<N>")` to `MoELayer(cfg, ep_group=...)`; `set_deepspeed_parallelism` checks that they match.

Our engine: `initialize(...)` (the arguments of `deepspeed.initialize`) builds a `MoEEngine`, a
DeepSpeedEngine subclass, for every model holding MoELayers; nothing in DeepSpeed changes for other
engines. It differs from DeepSpeed's engine in five places:
  * Sequence parallelism with `parallelize(..., defer_expert_grads=True)`: after DeepSpeed's gradient
    reduction, the experts' gradients are summed over TP once per step (moe/expert_grads.py).
  * ZeRO-0 in fp32: DeepSpeed clips by the mean over data parallelism of each rank's local norm (not the
    global norm once ranks hold different experts) and records no norm (get_global_grad_norm() is None).
    MoEEngine clips by moe.grad_norm.global_grad_norm, records it, and skips a non-finite step.
  * Names. In the module, routed experts are `<layer>.experts.<GLOBAL id>.{gate,up,down}_proj.weight`
    (rank r of an EP group of n holds ids [r*R/n, (r+1)*R/n)). DeepSpeed's `_save_moe_checkpoint` instead
    expects `...deepspeed_moe.experts.deepspeed_experts.<LOCAL id>...` (and crashes on anything else):
    during that call only, MoELayer.state_dict() reports its experts in that native naming; a load_state_dict
    pre-hook on MoELayer maps the native names back to ours.
  * Frozen experts (stage 2: requires_grad False, in no optimizer group). DeepSpeed's optimizer wrappers
    (ZeRO 1/2, bf16, fp16) assert that a model with MoE layers has an optimizer group marked `moe`; with
    every expert frozen there is none, and nothing for the expert-data-parallel groups to reduce, so the
    optimizer is built as for a dense model (`_configure_optimizer`). The engine itself still knows the
    MoE layers (per-expert checkpoint files).
  * Checkpoints with frozen experts: ZeRO-2 also copies every frozen parameter into the main model file
    ("frozen_param_fragments"), which data-parallel rank 0 writes with its own EP rank's experts only, and
    load_checkpoint would then look every rank's frozen experts up there. Frozen experts are saved in their
    per-expert files like trainable ones, so `save_checkpoint` leaves the frozen copies out when every
    frozen parameter is an expert.
The temporary swap of `deepspeed.DeepSpeedEngine` in `initialize` is how `deepspeed.initialize` (which
has no engine-class argument) builds our subclass; it is restored before `initialize` returns.

What `engine.save_checkpoint(dir, tag)` writes (ZeRO-1/2, any EP size, tp/mp rank 00)
-----------------------------------------------------------------------------------
  dir/tag/mp_rank_00_model_states.pt      data-parallel rank 0: {"module": every non-expert tensor
      (gate.weight, shared.*, the rest of the model), "num_experts": [R per MoE layer], ...,
      client_state keys}; NO routed-expert tensors.
  dir/tag/layer_{i}_expert_{g}_mp_rank_00_model_states.pt   one file per MoE layer i (order of
      `model.named_modules()`) and GLOBAL expert g, written by the expert-data-parallel rank 0 of the
      EP rank that holds g: {"<layer path>.deepspeed_moe.experts.deepspeed_experts.<g>.gate_proj.weight":
      ..., ".up_proj.weight", ".down_proj.weight"} (global id in the key, fp32/bf16 as trained).
  dir/tag/{bf16_}zero_pp_rank_{dp}_mp_rank_00_optim_states.pt   ZeRO optimizer partitions per rank
      (expert partitions are over the expert-data-parallel group, so their layout depends on EP/DP).
  dir/latest                               the tag.
`engine.load_checkpoint` with the same EP size restores everything. At another EP size the expert
files still load (each rank reads the files of the global ids it now holds; tested EP=2 -> EP=1 with
`load_checkpoint(..., load_module_only=True)`), but the ZeRO optimizer partitions do not: they are laid
out per (EP, DP) layout, so either restart the optimizer or reshard its state offline.
`expert_files_to_state_dict(tag_dir)` turns the files into one {our global name: tensor} dict.
"""

from __future__ import annotations

import contextvars
import glob
import math
import os
import re

import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.engine import DeepSpeedEngine

DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_NATIVE_VIEW = contextvars.ContextVar("unimoe_ds_native_view", default=False)
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def native_view_active() -> bool:
    return _NATIVE_VIEW.get()


def to_native_keys(state_dict: dict, prefix: str, first_expert: int) -> None:
    """In place: prefix + 'experts.<g>.' -> prefix + DS_EXPERT_PREFIX + '<g - first_expert>.'."""
    ours = prefix + "experts."
    for key in [k for k in state_dict if k.startswith(ours)]:
        gid, rest = key[len(ours):].split(".", 1)
        state_dict[f"{prefix}{DS_EXPERT_PREFIX}{int(gid) - first_expert}.{rest}"] = state_dict.pop(key)


def from_native_keys(state_dict: dict, prefix: str, first_expert: int) -> None:
    """In place: prefix + DS_EXPERT_PREFIX + '<local>.' -> prefix + 'experts.<first_expert + local>.'."""
    native = prefix + DS_EXPERT_PREFIX
    for key in [k for k in state_dict if k.startswith(native)]:
        lid, rest = key[len(native):].split(".", 1)
        state_dict[f"{prefix}experts.{first_expert + int(lid)}.{rest}"] = state_dict.pop(key)


class MoEEngine(DeepSpeedEngine):
    """DeepSpeedEngine for models holding moe.layer.MoELayer (see the module docstring)."""

    def _configure_optimizer(self, client_optimizer, model_parameters):
        experts_all_frozen = self.has_moe_layers and not any(
            is_moe_param(p) and p.requires_grad for p in self.module.parameters())
        if not experts_all_frozen:
            return super()._configure_optimizer(client_optimizer, model_parameters)
        self.has_moe_layers = False  # read by the optimizer wrappers' constructors only
        try:
            return super()._configure_optimizer(client_optimizer, model_parameters)
        finally:
            self.has_moe_layers = True

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        frozen = [p for p in self.module.parameters() if not p.requires_grad]
        exclude = exclude_frozen_parameters or (bool(frozen) and all(is_moe_param(p) for p in frozen))
        return super().save_checkpoint(save_dir, tag=tag, client_state=client_state or {},
                                       save_latest=save_latest, exclude_frozen_parameters=exclude)

    def allreduce_gradients(self, *args, **kwargs):
        """DeepSpeed's data-parallel reduction; then, at the accumulation boundary, the experts' gradient
        sum over TP that the model deferred to once per step (moe.expert_grads)."""
        super().allreduce_gradients(*args, **kwargs)
        group = getattr(self.module, "expert_grad_tp_group", None)
        if group is not None and self.is_gradient_accumulation_boundary():
            from moe.expert_grads import sum_expert_grads_over_tp
            sum_expert_grads_over_tp(self, group)

    def _take_model_step(self, lr_kwargs):
        """ZeRO-0 in fp32: clip by the real global norm (moe.grad_norm), record it for
        get_global_grad_norm(), and skip the update (like the ZeRO/bf16 paths) when it is not finite."""
        if self.fp16_enabled() or self.bfloat16_enabled() or self.zero_optimization():
            return super()._take_model_step(lr_kwargs)
        from moe.grad_norm import clip_grads_, global_grad_norm
        tp_group = self.mpu.get_model_parallel_group() if self.mpu is not None else None
        norm = global_grad_norm(self.module.parameters(), tp_group)
        self._global_grad_norm = float(norm)
        if not math.isfinite(self._global_grad_norm):
            self.zero_grad()
            self.skipped_steps += 1
            return  # _step_applied stays False
        if self.gradient_clipping() > 0:
            clip_grads_(self.module.parameters(), self.gradient_clipping(), norm)
        return super()._take_model_step(lr_kwargs)

    def clip_fp32_gradients(self):
        """Done by _take_model_step (DeepSpeed's averages each rank's norm over data parallelism)."""

    def _save_moe_checkpoint(self, *args, **kwargs):
        token = _NATIVE_VIEW.set(True)
        try:
            return super()._save_moe_checkpoint(*args, **kwargs)
        finally:
            _NATIVE_VIEW.reset(token)


def initialize(**kwargs):
    """deepspeed.initialize(**kwargs) with a MoEEngine as the engine; returns what it returns."""
    import deepspeed

    original = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = MoEEngine
    try:
        return deepspeed.initialize(**kwargs)
    finally:
        deepspeed.DeepSpeedEngine = original


def expert_key_to_name(key: str) -> str:
    """A key of DeepSpeed's per-expert files (global expert id, see above) -> our parameter name."""
    head, sep, tail = key.partition(DS_EXPERT_PREFIX)
    if not sep:
        raise ValueError(f"key {key!r} is not a DeepSpeed expert key ({DS_EXPERT_PREFIX})")
    return f"{head}experts.{tail}".lstrip(".")


def expert_files_to_state_dict(tag_dir: str) -> dict[str, torch.Tensor]:
    """All layer_*_expert_*_mp_rank_00 files of a DeepSpeed checkpoint tag -> {our global name: tensor}."""
    out = {}
    paths = sorted(p for p in glob.glob(os.path.join(tag_dir, "layer_*_expert_*_model_states.pt"))
                   if _EXPERT_FILE.search(p) and _EXPERT_FILE.search(p).group(3) == "00")
    for path in paths:
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            try:
                out[expert_key_to_name(key)] = value
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    return out
