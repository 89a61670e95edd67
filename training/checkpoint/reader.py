"""The training state of a checkpoint by parameter name, read lazily: only the tensors asked for are read.

    src = open_source("runs/stage3")     # a run dir, a tag dir, or an exported model.safetensors
    src.shapes                            # {name: (full shape, dtype)} of the whole model (all experts)
    src.read("layers.0.attn.qkv_proj.weight")            # full fp32 tensor, TP shards joined
    src.read(name, "exp_avg"), src.adam_step()           # AdamW state (checkpoints, not exports)
    src.read_shard(name, kind, tp_rank, fragment)        # one TP rank's shard, optionally a flat slice
    src.read_for(name, kind, tp_rank, tp, fragment)      # the same for a layout of another TP size

Sources:
    DeepSpeedSource   DeepSpeed's own files (zero_files.py): fp32 master and moments from the ZeRO-1/2
                      partitions; ZeRO-3 weights through DeepSpeed's zero_to_fp32
    ReshardedSource   TAG/resharded/*.safetensors of `unimoe ckpt reshard` (reshard.py)
    ExportedSource    model.safetensors + model.json of `unimoe ckpt export` (weights only; a bundle
                      directory, bundle.py, or the file)
A tag is verified against its COMPLETE manifest before anything is read. Nothing here unpickles code:
safetensors and JSON, or torch files with weights_only (torch_files.py); ZeRO-3 is the exception.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod

import torch

from training.checkpoint.bundle import WEIGHTS, is_bundle, resolve_bundle
from training.checkpoint.manifest import CheckpointError, find_verified, read_meta
from training.checkpoint.safetensors_io import SafetensorsReader
from training.checkpoint.zero_files import ZeroShard, zero3_full_state

OPTIMIZER_KINDS = ("exp_avg", "exp_avg_sq")  # AdamW's moments
KINDS = ("weight", *OPTIMIZER_KINDS)


def model_config_from_meta(meta: dict):
    from training.model.lm import ModelConfig
    return ModelConfig(**meta["model_config"])


def model_shapes(cfg) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every tensor of the whole model (all experts, no TP) as (shape, dtype), without allocating it."""
    from training.model.lm import AudioLM
    with torch.device("meta"):
        model = AudioLM(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


class Source(ABC):
    """What every source gives: the model config and shapes from its meta, tensors by name."""

    tp = 1

    def __init__(self, meta: dict, where: str):
        self.meta, self.where = meta, where
        self.cfg = model_config_from_meta(meta)
        self.shapes = model_shapes(self.cfg)

    def shard_shape(self, name: str, tp_rank: int, tp: int | None = None) -> tuple:
        from training.model.tensor_parallel import shard_kind, shard_tensor
        tp = self.tp if tp is None else tp
        full = torch.empty(self.shapes[name][0], device="meta")
        return tuple(shard_tensor(full, shard_kind(name), self.cfg, tp_rank, tp).shape)

    @abstractmethod
    def read_shard(self, name: str, kind: str, tp_rank: int, fragment=None, out=None) -> torch.Tensor | None:
        """TP rank `tp_rank`'s shard of a tensor, or its flat elements fragment = (start, numel); into
        `out` when given."""

    def read_for(self, name: str, kind: str, tp_rank: int, tp: int, fragment=None, out=None):
        """Rank tp_rank's shard of a tensor for a layout with `tp` TP ranks (any TP size: when it is not the
        saved one, the TP-split tensor is joined and split again), or its flat elements fragment =
        (start, numel); into `out` when given. None for a moment this checkpoint does not hold."""
        from training.model.tensor_parallel import shard_kind, shard_tensor
        split = shard_kind(name)
        if split is None or tp == self.tp:
            return self.read_shard(name, kind, tp_rank if split is not None else 0, fragment, out=out)
        full = self.read(name, kind)
        if full is None:
            return None
        t = shard_tensor(full, split, self.cfg, tp_rank, tp)
        return _into(t.reshape(-1).narrow(0, *fragment) if fragment is not None else t, out)

    def read(self, name: str, kind: str = "weight") -> torch.Tensor | None:
        """The full tensor (TP shards joined); None for a moment this checkpoint does not hold."""
        from training.model.tensor_parallel import merge_tensors, shard_kind
        if name not in self.shapes:
            raise CheckpointError(f"{self.where}: the model config has no tensor {name}")
        split = shard_kind(name) if self.tp > 1 else None
        if split is None:
            return self.read_shard(name, kind, 0)
        parts = [self.read_shard(name, kind, t) for t in range(self.tp)]
        return None if parts[0] is None else merge_tensors(parts, split, self.cfg)

    def adam_step(self) -> int:
        return 0

    @abstractmethod
    def stored_names(self) -> set[str]:
        """The tensor names the files hold (to catch files that do not match the meta's model config)."""

    def has_optimizer_state(self, name: str) -> bool:
        return False


class DeepSpeedSource(Source):
    def __init__(self, tag_dir: str):
        super().__init__(read_meta(tag_dir), tag_dir)
        self.tp = int(self.meta["layout"].get("tp", 1))
        self.shards = [ZeroShard(tag_dir, t, self.cfg.moe_layer_ids) for t in range(self.tp)]
        self.zero_stage = self.shards[0].zero_stage()
        self.zero3 = self.zero_stage == 3
        self._zero3_state = None
        if self.zero3 and self.tp > 1:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 with tensor parallelism cannot be read offline")

    def read_shard(self, name, kind, tp_rank, fragment=None, out=None):
        if self.zero3:
            if kind != "weight":
                raise CheckpointError(f"{self.where}: ZeRO-3 optimizer state cannot be read offline "
                                      "(resume at the saved layout, or train with ZeRO 1/2 to reshard)")
            t = self._zero3()[name].float()
        else:
            t = self.shards[tp_rank].read(name, kind, self.shard_shape(name, tp_rank))
        if t is not None and fragment is not None:
            t = t.reshape(-1).narrow(0, *fragment)
        return _into(t, out)

    def _zero3(self) -> dict:
        """The ZeRO-3 weights of the whole model, built once (zero_to_fp32) and kept."""
        if self._zero3_state is None:
            self._zero3_state = zero3_full_state(self.where)
        return self._zero3_state

    def adam_step(self) -> int:
        return 0 if self.zero3 else self.shards[0].adam_step()

    def has_optimizer_state(self, name: str) -> bool:
        return not self.zero3 and name in self.shards[0].index

    def stored_names(self) -> set[str]:
        if self.zero3:
            return set(self._zero3())
        return set().union(*(s.stored_names() for s in self.shards))


class ReshardedSource(Source):
    """resharded/tp{t}.safetensors: the tensors TP splits, rank t's shard; resharded/common.safetensors:
    the rest. Keys "<kind>/<name>", kinds weight, exp_avg, exp_avg_sq; AdamW's step in meta.json. Read
    with plain file reads into the destination (`out=`): a rank's memory holds only what it keeps."""

    def __init__(self, tag_dir: str):
        super().__init__(read_meta(tag_dir), tag_dir)
        self.tp = int(self.meta["layout"].get("tp", 1))
        self._open = {}

    def _file(self, name: str) -> SafetensorsReader:
        if name not in self._open:
            self._open[name] = SafetensorsReader(os.path.join(self.where, "resharded", name))
        return self._open[name]

    def _file_of(self, name: str, tp_rank: int):
        from training.model.tensor_parallel import shard_kind
        split = shard_kind(name) is not None
        return self._file(f"tp{tp_rank}.safetensors" if split else "common.safetensors")

    def read_shard(self, name, kind, tp_rank, fragment=None, out=None):
        f = self._file_of(name, tp_rank)
        key = f"{kind}/{name}"
        if key not in f.keys():
            return None
        start, numel = fragment if fragment is not None else (0, None)
        return f.read(key, start, numel, out)

    def adam_step(self) -> int:
        return int(self.meta.get("adam_step", 0))

    def has_optimizer_state(self, name: str) -> bool:
        return f"exp_avg/{name}" in self._file_of(name, 0).keys()

    def stored_names(self) -> set[str]:
        files = ["common.safetensors"] + [f"tp{t}.safetensors" for t in range(self.tp)]
        return {k.split("/", 1)[1] for f in files for k in self._file(f).keys()}


class ExportedSource(Source):
    def __init__(self, path: str):
        meta_path = exported_meta_path(path)
        if not os.path.exists(meta_path):
            raise CheckpointError(f"{path}: its meta file {meta_path} is missing (both are written by "
                                  "`unimoe ckpt export`)")
        with open(meta_path) as f:
            super().__init__(resolve_bundle(json.load(f), os.path.dirname(os.path.abspath(path))), path)
        from safetensors import safe_open
        try:
            self._f = safe_open(path, framework="pt")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def read_shard(self, name, kind, tp_rank, fragment=None, out=None):
        if kind != "weight":
            return None
        if name not in self._f.keys():
            raise CheckpointError(f"{self.where}: no tensor {name}; the export does not match its model "
                                  "config")
        t = self._f.get_tensor(name)
        return _into(t if fragment is None else t.reshape(-1).narrow(0, *fragment), out)

    def stored_names(self) -> set[str]:
        return set(self._f.keys())


def _into(t: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor | None:
    return t if out is None or t is None else out.copy_(t.reshape(out.shape))


def exported_meta_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def open_source(path: str) -> Source:
    """A run dir / checkpoints dir / tag dir (newest complete tag, verified), an exported bundle directory or
    an exported model.safetensors. Pickle files (an old model.pt) are refused unread."""
    if is_bundle(path):
        return ExportedSource(os.path.join(path, WEIGHTS))
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return ExportedSource(path)
        raise CheckpointError(f"{path}: not read: exported models are .safetensors files with a .json meta "
                              "file (they run no code when loaded); a .pt file is a pickle. Export the run "
                              "with `unimoe ckpt export --ckpt RUN --out DIR`")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist (give a run dir, a checkpoints/step_* dir or an "
                              "exported model directory)")
    tag_dir = find_verified(path)
    if os.path.isdir(os.path.join(tag_dir, "resharded")):
        return ReshardedSource(tag_dir)
    return DeepSpeedSource(tag_dir)
