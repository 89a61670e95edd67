"""The exported model as a directory that travels: `unimoe ckpt export --out DIR` writes

    DIR/model.safetensors   fp32 weights (export.py)
    DIR/model.json          meta: model config, codec info, tokenizer_sha256, "bundle" (relative paths)
    DIR/tokenizer.model     the sentencepiece model the data was prepared with
    DIR/codec.json          the codec: name, sample rate, fingerprint and its whole info dict
    DIR/codec/<file>        the codec weights, when the codec info names a local file of at most 64 MiB

Paths in the meta's "bundle" are relative to DIR and resolved when the bundle is opened (resolve_bundle), so
the directory loads from wherever it is copied to. Exports of the older layout (a `model.safetensors` file
with `model.json` beside it and absolute paths) load as they are.
"""

from __future__ import annotations

import json
import os
import shutil

from data_prep.shards import sha256_file
from training.checkpoint.manifest import CheckpointError, write_atomic

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"
CODEC_JSON = "codec.json"
CODEC_DIR = "codec"
MAX_CODEC_BYTES = 64 * 2**20  # codec weights larger than this stay outside (`--codec-checkpoint`)


def is_bundle(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS))


def weights_path(out: str) -> str:
    """Where export writes the weights: OUT for a *.safetensors (older layout), else OUT/model.safetensors."""
    return out if out.endswith(".safetensors") else os.path.join(out, WEIGHTS)


def checked_tokenizer(meta: dict, where: str) -> tuple[str, str]:
    """(path, sha256) of the checkpoint's tokenizer; refuses a missing file or one whose bytes changed."""
    path = meta.get("tokenizer_path")
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{where}: the tokenizer it was trained with ({path}) is missing; restore that "
                              "spm.model to export a bundle")
    sha = sha256_file(path)
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != sha:
        want = meta["tokenizer_sha256"][:12]
        raise CheckpointError(f"{where}: its tokenizer {path} has sha256 {sha[:12]}.. but the model was "
                              f"trained with {want}..: the file was replaced; restore it")
    return path, sha


def write_bundle_files(out_dir: str, meta: dict, where: str, log=print) -> dict:
    """Copy the tokenizer and (small, local) codec weights into out_dir, write codec.json; returns the meta
    to write as model.json (paths relative to out_dir under "bundle")."""
    tok_path, tok_sha = checked_tokenizer(meta, where)
    shutil.copyfile(tok_path, os.path.join(out_dir, TOKENIZER))
    meta = {**meta, "tokenizer_path": TOKENIZER, "tokenizer_sha256": tok_sha}
    bundle = {"tokenizer": TOKENIZER}
    info = dict(meta.get("codec_info") or {})
    ckpt = info.get("checkpoint")
    if ckpt and os.path.isfile(ckpt) and os.path.getsize(ckpt) <= MAX_CODEC_BYTES:
        rel = os.path.join(CODEC_DIR, os.path.basename(ckpt))
        os.makedirs(os.path.join(out_dir, CODEC_DIR), exist_ok=True)
        shutil.copyfile(ckpt, os.path.join(out_dir, rel))
        info["checkpoint"] = rel
        bundle["codec_checkpoint"] = rel
    elif ckpt:
        why = "not found here" if not os.path.isfile(ckpt) else f"larger than {MAX_CODEC_BYTES >> 20} MiB"
        log(f"note: the codec weights {ckpt} are not in the bundle ({why}): pass --codec-checkpoint PATH to "
            "generate where the bundle goes")
    meta["codec_info"] = info
    meta["bundle"] = bundle
    codec = {k: info.get(k) for k in ("name", "sample_rate", "fingerprint")}
    write_atomic(os.path.join(out_dir, CODEC_JSON), json.dumps({**codec, "info": info}, indent=1))
    return meta


def resolve_bundle(meta: dict, base: str) -> dict:
    """The meta with the bundle's relative paths made absolute against `base` (the bundle directory)."""
    bundle = meta.get("bundle")
    if not bundle:
        return meta
    meta = {**meta, "tokenizer_path": os.path.join(base, bundle["tokenizer"])}
    if bundle.get("codec_checkpoint"):
        codec_file = os.path.join(base, bundle["codec_checkpoint"])
        meta["codec_info"] = {**meta["codec_info"], "checkpoint": codec_file}
    return meta
