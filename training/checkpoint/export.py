"""`unimoe ckpt export --ckpt RUN --out model.safetensors`: the consolidated fp32 weights as safetensors plus
model.json (step, model config, codec info, tokenizer path, the run config), the files to share.

Loading them runs no code (`generate`, `eval` and `stage.init_from` read them with safetensors and json).
The checkpoint must be complete and intact (its COMPLETE manifest), hold exactly the tensors of its model
config, each with its shape; otherwise nothing is written. Tensors are written one at a time
(safetensors_io.py), so the export needs memory for one tensor, not the model.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from training.checkpoint.manifest import CheckpointError, write_atomic
from training.checkpoint.reader import exported_meta_path, open_source
from training.checkpoint.safetensors_io import write_safetensors


def export_cli(args) -> int:
    if not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out}: name the file *.safetensors (model.json is written beside it)",
              file=sys.stderr)
        return 2
    try:
        src = open_source(args.ckpt)
        stored = src.stored_names()
        unexpected = sorted(stored - set(src.shapes))
        if unexpected:
            raise CheckpointError(f"{src.where}: holds {len(unexpected)} tensors its model config does not "
                                  f"have, e.g. {unexpected[:3]}; the meta.json and the files disagree")
        specs = [(n, shape, torch.float32 if dtype.is_floating_point else dtype)
                 for n, (shape, dtype) in src.shapes.items()]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        size = write_safetensors(args.out, specs, lambda n: _checked(src, n), {"format": "pt"})
    except (CheckpointError, ValueError) as e:  # ValueError: a tensor that does not fit the header
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {k: v for k, v in src.meta.items() if k != "adam_step"}
    meta["exported_from"] = os.path.abspath(src.where)
    write_atomic(exported_meta_path(args.out), json.dumps(meta, indent=1, default=str))
    n = sum(torch.Size(shape).numel() for _, shape, _ in specs)
    print(f"exported {len(specs)} tensors ({n / 1e6:.2f} M values, {size / 2**20:.1f} MiB) of step "
          f"{meta.get('step')} to {args.out} (+ {exported_meta_path(args.out)})")
    return 0


def _checked(src, name: str) -> torch.Tensor:
    t = src.read(name)
    if t is None:
        raise CheckpointError(f"{src.where}: no value for {name}")
    return t.float() if t.is_floating_point() else t
