"""Checkpoints: DeepSpeed ZeRO checkpoints + client state, atomic visibility, resume, export, reshard.

Run dir layout:
    RUN/checkpoints/latest                 name of the newest COMPLETE tag (written last, atomically)
    RUN/checkpoints/step_00000040/         one DeepSpeed tag:
        mp_rank_00_model_states.pt         DeepSpeed: module state dict (+ our client state of rank 0)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt / expp_rank_* / layer_*_expert_*   DeepSpeed's files
        client/rank{r}.pt                  per rank: step, data position, python/numpy/torch RNG, counters
        portable/tp{t}_rank{r}.pt          layout-independent weights + AdamW state by name (ckpt_portable)
        meta.json                          step, layout, run config, model config, codec info, tokenizer
        COMPLETE                           written by rank 0 after every rank finished: the tag is usable
A tag without COMPLETE (a crash or kill mid-save) is invisible to --resume auto and deleted later.

Resume at the saved layout uses DeepSpeed's load_checkpoint (exact); at another EP/DP layout (after
`unimoe ckpt reshard`, or a different number of processes) it loads the portable state (also exact for
weights and AdamW moments; the RNG of ranks that did not exist before is re-seeded).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

CKPT_SUBDIR = "checkpoints"
COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tag dirs, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.exists(os.path.join(ckpt_dir, t,
                                                                                                  COMPLETE))]
    return [os.path.join(ckpt_dir, t) for t in sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))]


def save(engine, pg, run_dir: str, step: int, client_state: dict, meta: dict, keep_last: int) -> str:
    """Collective. Writes tag step_<step>; returns its path once every rank finished and COMPLETE exists."""
    ckpt_dir = os.path.join(run_dir, CKPT_SUBDIR)
    tag = tag_name(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if pg.is_main and os.path.exists(tag_dir):
        shutil.rmtree(tag_dir)  # a stale or incomplete save of the same step
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    from training.ckpt_portable import save_portable
    save_portable(engine, pg, tag_dir)
    os.makedirs(os.path.join(tag_dir, "client"), exist_ok=True)
    path = os.path.join(tag_dir, "client", f"rank{pg.env.rank:05d}.pt")
    torch.save(client_state, path + ".tmp")
    os.replace(path + ".tmp", path)
    _barrier()  # every rank's files are on disk before the tag becomes visible
    if pg.is_main:
        _write_atomic(os.path.join(tag_dir, "meta.json"), json.dumps(meta, indent=1, default=str))
        _write_atomic(os.path.join(tag_dir, COMPLETE), f"{step}\n")
        _write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep_last)
    _barrier()
    return tag_dir


def prune(ckpt_dir: str, keep_last: int) -> None:
    complete = complete_tags(ckpt_dir)
    newest = int(TAG_RE.match(os.path.basename(complete[-1])).group(1)) if complete else -1
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for t in os.listdir(ckpt_dir):  # leftovers of interrupted saves older than the newest complete one
        m = TAG_RE.match(t)
        if m and int(m.group(1)) < newest and not os.path.exists(os.path.join(ckpt_dir, t, COMPLETE)):
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def find_checkpoint(path: str) -> str | None:
    """A run dir, its checkpoints/ dir or one tag dir -> the newest complete tag dir (None: nothing yet)."""
    if os.path.exists(os.path.join(path, COMPLETE)):
        return path
    for d in (os.path.join(path, CKPT_SUBDIR), path):
        tags = complete_tags(d)
        if tags:
            return tags[-1]
    return None


def read_meta(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, "meta.json")) as f:
        return json.load(f)


def resume(engine, pg, tag_dir: str, layout: dict) -> dict:
    """Collective. Loads the training state; returns this rank's client state (step, data, ...)."""
    meta = read_meta(tag_dir)
    saved = meta["layout"]
    same = all(saved.get(k) == layout.get(k) for k in ("world_size", "tp", "ep", "zero_stage"))
    has_ds_files = bool(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))  # ZeRO-3: zero_pp_*
    native = same and has_ds_files and (engine.has_moe_layers or layout["ep"] == 1)
    rank_file = os.path.join(tag_dir, "client", f"rank{pg.env.rank:05d}.pt")
    if native:
        ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
        engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    else:
        from training.ckpt_portable import load_portable, read_portable
        if saved.get("tp") != layout["tp"]:
            raise ValueError(f"{tag_dir}: saved with tp={saved.get('tp')}, this run has tp={layout['tp']}; "
                             "changing the tensor-parallel size is not supported")
        load_portable(engine, read_portable(tag_dir, pg.tp_rank))
    if not os.path.exists(rank_file):  # a rank that did not exist in the saved layout
        rank_file = os.path.join(tag_dir, "client", "rank00000.pt")
        client = torch.load(rank_file, map_location="cpu", weights_only=False)
        client["rng"] = None
    else:
        client = torch.load(rank_file, map_location="cpu", weights_only=False)
    client["resumed_native"] = native
    _barrier()
    return client


# ---------------------------------------------------------------- consolidated weights (no DeepSpeed)

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
        from training.ckpt_portable import read_portable
        shards = []
        for r in range(tp):
            state = read_portable(tag_dir, r)
            shards.append({**state["params"], **state["buffers"]})
        if tp > 1:  # megatron-sharded tensors are concatenated back (training.tensor_parallel rules)
            from training.tensor_parallel import merge_state_dicts
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
    from training.model import ModelConfig
    return ModelConfig(**meta["model_config"])


def load_for_inference(path: str, device: str = "cpu"):
    """-> (AudioLM in eval mode, all experts local; meta with model_config, codec_info, tokenizer_path)."""
    from training.model import AudioLM
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


# ---------------------------------------------------------------- CLIs

def export_cli(args) -> int:
    sd, meta = full_state_dict(args.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": sd, "meta": meta}, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    n = sum(v.numel() for v in sd.values() if torch.is_tensor(v))
    print(f"exported {len(sd)} tensors ({n / 1e6:.2f} M values, fp32) of step {meta['step']} to {args.out}")
    return 0


def reshard_cli(args) -> int:
    """Same training state for another EP (and DP) size: the portable state is layout-independent, so
    the new tag holds it (+ client state and meta with the target layout); DeepSpeed's own flat files are
    not copied (they only load at their own layout). Resume with `--resume OUT parallel.ep=N`."""
    tag_dir = find_checkpoint(args.ckpt)
    if tag_dir is None:
        print(f"error: {args.ckpt}: no complete checkpoint found")
        return 2
    if not glob.glob(os.path.join(tag_dir, "portable", "tp*_rank*.pt")):
        print(f"error: {tag_dir} has no portable/ state (written by every save of this trainer)")
        return 2
    meta = read_meta(tag_dir)
    layout = dict(meta["layout"])
    moe = meta["config"].get("moe")
    n_exp = (moe or {}).get("num_routed_experts", 8) if moe else None
    dp = args.dp or layout["world_size"] // layout["tp"]
    if moe is None and args.ep != 1:
        print("error: a dense checkpoint has no experts: use --ep 1")
        return 2
    if n_exp is not None and n_exp % args.ep:
        print(f"error: --ep {args.ep} must divide the number of routed experts {n_exp}")
        return 2
    if dp % args.ep:
        print(f"error: --ep {args.ep} must divide the data-parallel size {dp} (set --dp)")
        return 2
    out_tag = os.path.join(args.out, CKPT_SUBDIR, os.path.basename(tag_dir))
    if os.path.exists(out_tag):
        shutil.rmtree(out_tag)
    os.makedirs(out_tag)
    shutil.copytree(os.path.join(tag_dir, "portable"), os.path.join(out_tag, "portable"))
    clients = sorted(glob.glob(os.path.join(tag_dir, "client", "rank*.pt")))
    os.makedirs(os.path.join(out_tag, "client"))
    for f in clients[: dp * layout["tp"]]:
        shutil.copy(f, os.path.join(out_tag, "client"))
    meta["resharded_from"] = {"checkpoint": os.path.abspath(tag_dir), "layout": layout}
    meta["layout"] = {**layout, "ep": args.ep, "world_size": dp * layout["tp"]}
    meta["config"]["parallel"]["ep"] = args.ep
    _write_atomic(os.path.join(out_tag, "meta.json"), json.dumps(meta, indent=1, default=str))
    _write_atomic(os.path.join(out_tag, COMPLETE), f"{meta['step']}\n")
    _write_atomic(os.path.join(args.out, CKPT_SUBDIR, "latest"), os.path.basename(out_tag))
    print(f"resharded {tag_dir} (ep={layout['ep']}, dp={layout['world_size'] // layout['tp']}) -> {out_tag} "
          f"(ep={args.ep}, dp={dp}); continue with: unimoe train --config ... --resume {args.out} "
          f"parallel.ep={args.ep}")
    return 0
