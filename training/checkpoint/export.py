"""`unimoe ckpt export --ckpt RUN --out DIR`: the consolidated fp32 weights as a bundle that travels
(bundle.py: DIR/model.safetensors, DIR/model.json, the tokenizer and the codec description, small codec
weights included). `--out model.safetensors` writes the older layout (weights + model.json beside them,
absolute tokenizer path).

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

from training.checkpoint.bundle import checked_tokenizer, weights_path, write_bundle_files
from training.checkpoint.manifest import CheckpointError, write_atomic
from training.checkpoint.reader import exported_meta_path, open_source
from training.checkpoint.safetensors_io import write_safetensors


def export_cli(args) -> int:
    if os.path.splitext(args.out)[1] and not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out}: give a directory (the bundle) or a *.safetensors file",
              file=sys.stderr)
        return 2
    out = weights_path(args.out)
    bundle_dir = None if out == args.out else args.out
    try:
        src = open_source(args.ckpt)
        meta = {k: v for k, v in src.meta.items() if k != "adam_step"}
        meta["exported_from"] = os.path.abspath(src.where)
        if bundle_dir is None and meta.get("tokenizer_path") and os.path.isfile(meta["tokenizer_path"]):
            meta["tokenizer_sha256"] = checked_tokenizer(meta, src.where)[1]
        elif bundle_dir is not None:
            checked_tokenizer(meta, src.where)  # before the weights are written
        stored = src.stored_names()
        unexpected = sorted(stored - set(src.shapes))
        if unexpected:
            raise CheckpointError(f"{src.where}: holds {len(unexpected)} tensors its model config does not "
                                  f"have, e.g. {unexpected[:3]}; the meta.json and the files disagree")
        specs = [(n, shape, torch.float32 if dtype.is_floating_point else dtype)
                 for n, (shape, dtype) in src.shapes.items()]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        size = write_safetensors(out, specs, lambda n: _checked(src, n), {"format": "pt"})
        if bundle_dir is not None:
            meta = write_bundle_files(bundle_dir, meta, src.where)
    except (CheckpointError, ValueError, OSError) as e:  # ValueError: a tensor that does not fit the header
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomic(exported_meta_path(out), json.dumps(meta, indent=1, default=str))
    n = sum(torch.Size(shape).numel() for _, shape, _ in specs)
    where = (f"{bundle_dir} (model.safetensors, model.json, tokenizer, codec)" if bundle_dir
             else f"{out} (+ {exported_meta_path(out)})")
    print(f"exported {len(specs)} tensors ({n / 1e6:.2f} M values, {size / 2**20:.1f} MiB) of step "
          f"{meta.get('step')} to {where}")
    return 0


def _checked(src, name: str) -> torch.Tensor:
    t = src.read(name)
    if t is None:
        raise CheckpointError(f"{src.where}: no value for {name}")
    return t.float() if t.is_floating_point() else t
