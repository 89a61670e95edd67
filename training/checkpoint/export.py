"""Consolidated weights without DeepSpeed: a run dir, a tag or an exported model -> one fp32 state dict.

    sd, meta = full_state_dict("runs/stage3")            # newest complete tag, experts by global index
    model, meta = load_for_inference("model.pt")         # AudioLM in eval mode, all experts local
    unimoe ckpt export --ckpt RUN --out model.pt          # export_cli

TP shards are merged back (training.model.tensor_parallel rules).
"""

from __future__ import annotations

import glob
import os

import torch

from training.checkpoint.save import COMPLETE, find_checkpoint, read_meta


def _deepspeed_module_state(tag_dir: str) -> dict:
    """mp_rank_00 module state + per-expert files (keys already carry global expert ids)."""
    main = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                      weights_only=False)
    sd = dict(main["module"])
    from moe.deepspeed_compat import expert_files_to_state_dict
    sd.update(expert_files_to_state_dict(tag_dir))
    return sd


def full_state_dict(path: str) -> tuple[dict, dict]:
    """(fp32 state dict of the whole model, meta) from a run dir, tag dir or exported model.pt."""
    if os.path.isfile(path):
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if "model" not in blob or "meta" not in blob:
            raise ValueError(f"{path}: not an exported model (expected keys 'model' and 'meta'; "
                             "make one with `unimoe ckpt export`)")
        return blob["model"], blob["meta"]
    tag_dir = find_checkpoint(path)
    if tag_dir is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a run dir, a checkpoints/step_* dir with "
                                f"{COMPLETE}, or an exported model.pt)")
    meta = read_meta(tag_dir)
    tp = meta["layout"].get("tp", 1)
    if glob.glob(os.path.join(tag_dir, "portable", "tp0_rank*.pt")):
        from training.checkpoint.portable import read_portable
        shards = []
        for r in range(tp):
            state = read_portable(tag_dir, r)
            shards.append({**state["params"], **state["buffers"]})
        if tp > 1:  # megatron-sharded tensors are concatenated back (training.model.tensor_parallel rules)
            from training.model.tensor_parallel import merge_state_dicts
            sd = merge_state_dicts(shards, model_config_from_meta(meta))
        else:
            sd = shards[0]
    elif tp > 1:
        raise NotImplementedError(f"{tag_dir}: no portable/ state; consolidating DeepSpeed's tensor-parallel "
                                  "files is not supported")
    else:
        sd = {k: v.float() if v.is_floating_point() else v
              for k, v in _deepspeed_module_state(tag_dir).items()}
    meta["checkpoint"] = os.path.abspath(tag_dir)
    return sd, meta


def model_config_from_meta(meta: dict):
    from training.model.lm import ModelConfig
    return ModelConfig(**meta["model_config"])


def load_for_inference(path: str, device: str = "cpu"):
    """-> (AudioLM in eval mode, all experts local; meta with model_config, codec_info, tokenizer_path)."""
    from training.model.lm import AudioLM
    sd, meta = full_state_dict(path)
    model = AudioLM(model_config_from_meta(meta))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), meta


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


def export_cli(args) -> int:
    sd, meta = full_state_dict(args.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": sd, "meta": meta}, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    n = sum(v.numel() for v in sd.values() if torch.is_tensor(v))
    print(f"exported {len(sd)} tensors ({n / 1e6:.2f} M values, fp32) of step {meta['step']} to {args.out}")
    return 0
