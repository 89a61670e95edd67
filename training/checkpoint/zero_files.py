"""DeepSpeed's own files of one checkpoint tag and one TP rank, read by parameter name.

ZeRO-1/2 keep, per data-parallel rank, flat fp32 partitions of each optimizer param group
(`single_partition_of_fp32_groups`), AdamW's moments over the same partitions (`base_optimizer_state`)
and `param_slice_mappings`: name -> (start, numel) of the part of that parameter the rank holds. A
parameter is the concatenation of its parts in rank order (expert groups are partitioned over the
expert-data-parallel group, whose ranks are in the same order), as DeepSpeed's ds_to_universal rebuilds
it. Tensors the optimizer does not hold come from the module files: mp_rank_XX_model_states.pt and one
layer_{i}_expert_{g}_mp_rank_XX file per MoE layer i and global expert g (moe/deepspeed_compat.py).

Files are memory-mapped and unpickled with weights_only (torch_files.py), each the first time it is
needed, so reading a parameter pages in only its parts: never the moments unless asked for them.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from training.checkpoint.manifest import CheckpointError
from training.checkpoint.torch_files import deepspeed_globals, load_weights_only

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(.+)$")
_ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _load(path: str):
    return load_weights_only(path, deepspeed_globals(), mmap=True)


class ZeroShard:
    """One TP rank's DeepSpeed files (ZeRO 0, 1 or 2)."""

    def __init__(self, tag_dir: str, tp_rank: int, moe_layer_ids: list[int]):
        self.tag_dir, self.tp_rank, self.moe_layer_ids = tag_dir, tp_rank, moe_layer_ids
        self._files: dict[str, object] = {}
        self._index = None

    def _file(self, name: str):
        if name not in self._files:
            self._files[name] = _load(os.path.join(self.tag_dir, name))
        return self._files[name]

    def zero_file_names(self) -> list[str]:
        pattern = f"*zero_pp_rank_*_mp_rank_{self.tp_rank:02d}_optim_states.pt"
        paths = glob.glob(os.path.join(self.tag_dir, pattern))
        return [os.path.basename(p) for p in sorted(paths, key=lambda p: int(_ZERO_FILE.search(p).group(1)))]

    def _zero(self, name: str) -> dict:
        return self._file(name)["optimizer_state_dict"]

    @property
    def index(self) -> dict[str, list[tuple[str, int, int, int]]]:
        """name -> [(zero file, param group, start, numel)] in rank order."""
        if self._index is None:
            self._index = {}
            for fname in self.zero_file_names():
                for g, mapping in enumerate(self._zero(fname).get("param_slice_mappings") or []):
                    for name, frag in mapping.items():
                        self._index.setdefault(name, []).append((fname, g, frag.start, frag.numel))
        return self._index

    def _flat(self, fname: str, group: int, kind: str) -> torch.Tensor:
        sd = self._zero(fname)
        if kind == "weight":
            return sd["single_partition_of_fp32_groups"][group]
        return sd["base_optimizer_state"]["state"][group][kind]

    def read(self, name: str, kind: str, shape: tuple) -> torch.Tensor | None:
        """fp32 master weight (kind "weight") or an AdamW moment of this TP rank's shard; None for a moment
        the optimizer does not hold."""
        parts = self.index.get(name)
        if parts:
            t = torch.cat([self._flat(f, g, kind).narrow(0, start, numel) for f, g, start, numel in parts])
        elif kind == "weight":
            t = self._module_tensor(name).float()
        else:
            return None
        if t.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"{self.tag_dir}: {name} holds {t.numel()} values, the model config wants "
                                  f"{tuple(shape)}; a file is missing or from another run")
        return t.reshape(shape)

    def _module_tensor(self, name: str) -> torch.Tensor:
        m = _EXPERT.match(name)
        if m is None:
            fname, key = f"mp_rank_{self.tp_rank:02d}_model_states.pt", name
            state = self._file(fname)["module"]
        else:
            layer, expert, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            i = self.moe_layer_ids.index(layer)
            fname = f"layer_{i}_expert_{expert}_mp_rank_{self.tp_rank:02d}_model_states.pt"
            from moe.deepspeed_compat import DS_EXPERT_PREFIX
            key, state = f"layers.{layer}.ffn.{DS_EXPERT_PREFIX}{expert}.{rest}", self._file(fname)
        if key not in state:
            raise CheckpointError(f"{os.path.join(self.tag_dir, fname)}: no tensor {key}")
        return state[key]

    def stored_names(self) -> set[str]:
        """Every parameter name these files hold (optimizer partitions, module, expert files)."""
        from moe.deepspeed_compat import expert_key_to_name
        names = set(self.index)
        module = f"mp_rank_{self.tp_rank:02d}_model_states.pt"
        if os.path.exists(os.path.join(self.tag_dir, module)):
            names |= set(self._file(module)["module"])
        pattern = f"layer_*_expert_*_mp_rank_{self.tp_rank:02d}_model_states.pt"
        for path in glob.glob(os.path.join(self.tag_dir, pattern)):
            for key in self._file(os.path.basename(path)):
                try:
                    names.add(expert_key_to_name(key))
                except ValueError as e:
                    raise CheckpointError(f"{path}: {e}") from None
        return names

    def adam_step(self) -> int:
        for fname in self.zero_file_names()[:1]:
            for state in self._zero(fname)["base_optimizer_state"]["state"].values():
                if "step" in state:
                    return int(state["step"])
        return 0

    def zero_stage(self) -> int:
        names = self.zero_file_names()
        if not names:
            return 0
        return int(self._zero(names[0]).get("zero_stage", 0))


def zero3_full_state(tag_dir: str) -> dict:
    """ZeRO-3 weights (fp32, whole model) through DeepSpeed's own zero_to_fp32 (it unpickles the files)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
