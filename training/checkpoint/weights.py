"""Model weights out of checkpoints and exports (reader.py), for inference and for stage starts.

    sd, meta = full_state_dict("runs/stage3")           # fp32, whole model, experts by global index
    model, meta = load_for_inference("model.safetensors")   # AudioLM in eval mode, all experts local
    load_weights(model, "runs/stage2")                   # stage start: only the tensors this rank holds
    load_into_model(model, full_sd, "upcycle(...)")      # a full state dict: each rank takes its names
"""

from __future__ import annotations

import torch

from training.checkpoint.manifest import CheckpointError
from training.checkpoint.reader import model_config_from_meta, open_source


def full_state_dict(path: str) -> tuple[dict, dict]:
    """(fp32 state dict of the whole model, meta) from a run dir, tag dir or exported model.safetensors."""
    src = open_source(path)
    sd = {name: src.read(name) for name in src.shapes}
    return sd, {**src.meta, "checkpoint": src.where}


def load_for_inference(path: str, device: str = "cpu"):
    """-> (AudioLM in eval mode, all experts local; meta with model_config, codec_info, tokenizer_path)."""
    from training.model.lm import AudioLM
    sd, meta = full_state_dict(path)
    model = AudioLM(model_config_from_meta(meta))
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), meta


def load_weights(model, path: str) -> dict:
    """Stage start: copy the weights of `path` into `model` (before tensor parallelism is applied; under
    expert parallelism it holds only its own experts). Reads only the tensors the model holds: each
    parameter's fp32 master weight, never optimizer moments or other ranks' experts. Returns the meta."""
    src = open_source(path)
    check_codebooks(src.meta, model.cfg, path)
    own = model.state_dict()
    missing = [k for k in own if k not in src.shapes]
    if missing:
        raise CheckpointError(f"{path}: its model config lacks {len(missing)} tensors of this model, e.g. "
                              f"{missing[:3]}")
    with torch.no_grad():
        for name, t in own.items():
            value = src.read(name)
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, this model wants "
                                      f"{tuple(t.shape)}")
            t.copy_(value)
    return src.meta


def check_codebooks(meta: dict, model_cfg, source: str) -> None:
    """A stage starts from runs trained on the same codec layout as its data: the codebooks and their size
    recorded in the source's meta must be the model's (which follow this stage's data)."""
    recorded = meta.get("model_config") or {}
    codec = meta.get("codec_info") or {}
    for key in ("num_codebooks", "codebook_size"):
        if recorded.get(key) is not None and int(recorded[key]) != int(getattr(model_cfg, key)):
            raise CheckpointError(
                f"{source} was trained on codec {codec.get('name')!r} ({recorded.get('num_codebooks')} "
                f"codebooks of {recorded.get('codebook_size')} codes) but this stage's model has "
                f"{model_cfg.num_codebooks} codebooks of {model_cfg.codebook_size} (from its data): start "
                "from runs trained on data prepared with the same codec")


def load_into_model(model, sd: dict, source: str) -> None:
    """Load a full-model state dict into a (possibly expert-parallel) model: each rank takes its names."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise KeyError(f"{source}: missing {len(missing)} weights of this model, e.g. {missing[:3]}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, model wants {tuple(v.shape)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
