"""Which tokenizer a checkpoint, an export or a mixture was made with, and the checks that refuse a mix.

Checkpoints record `tokenizer_sha256` in their meta (training.train), exports keep it (export.py), and
`unimoe data mix` records it in mix.json. Text ids of one sentencepiece model mean nothing to a model
trained with another, so:
    check_init_sources   stage starts (stage.init_from): the specialists share one tokenizer (and text vocab
                         size), and it is the one the stage's data was prepared with; before any process group
    check_model_data     `unimoe eval`: the model's tokenizer is the one the mixture was prepared with
Checkpoints from before the hash was recorded get a warning, not a refusal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from training.checkpoint.bundle import WEIGHTS, is_bundle, resolve_bundle
from training.checkpoint.manifest import find_checkpoint, read_meta
from training.config import ConfigError


@dataclass
class TokenizerId:
    where: str  # the checkpoint, export or mix.json
    path: str | None
    sha256: str | None
    vocab_size: int | None = None

    def describe(self) -> str:
        sha = f"sha256 {self.sha256[:12]}.." if self.sha256 else "no sha256 recorded"
        vocab = f", {self.vocab_size} pieces" if self.vocab_size else ""
        return f"{self.where} (tokenizer {self.path}, {sha}{vocab})"


def source_meta(path: str) -> dict | None:
    """The meta of a run dir / tag dir / exported bundle / exported .safetensors, without reading weights;
    None when there is no complete checkpoint."""
    from training.checkpoint.reader import exported_meta_path
    if os.path.isfile(path) or is_bundle(path):
        weights = os.path.join(path, WEIGHTS) if is_bundle(path) else path
        with open(exported_meta_path(weights)) as f:
            return resolve_bundle(json.load(f), os.path.dirname(os.path.abspath(weights)))
    tag = find_checkpoint(path)
    return None if tag is None else read_meta(tag)


def of_meta(meta: dict, where: str) -> TokenizerId:
    vocab = (meta.get("model_config") or {}).get("text_vocab_size")
    return TokenizerId(where, meta.get("tokenizer_path"), meta.get("tokenizer_sha256"), vocab)


def of_mix(mix_json: str) -> TokenizerId:
    with open(mix_json, encoding="utf-8") as f:
        mix = json.load(f)
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(mix_json)), mix["tokenizer"]))
    return TokenizerId(mix_json, path, mix.get("tokenizer_sha256"))


def differ(a: TokenizerId, b: TokenizerId) -> bool:
    return bool(a.sha256 and b.sha256 and a.sha256 != b.sha256)


def unchecked(ids: list[TokenizerId]) -> list[str]:
    return [t.where for t in ids if not t.sha256]


def check_init_sources(sources: list[str], data_mix: str | None, log=print) -> None:
    """Raise ConfigError (exit 2) when stage.init_from's checkpoints were trained with different tokenizers
    or text vocab sizes, or with another tokenizer than the stage's mix.json `data_mix` was prepared with."""
    ids = []
    for src in sources:
        meta = source_meta(src)
        if meta is not None:
            ids.append(of_meta(meta, src))
    for other in ids[1:]:
        if differ(ids[0], other) or (ids[0].vocab_size and other.vocab_size
                                     and ids[0].vocab_size != other.vocab_size):
            raise ConfigError(f"stage.init_from: the checkpoints were trained with different tokenizers: "
                              f"{ids[0].describe()} and {other.describe()}; train every specialist on data "
                              "prepared with one spm.model")
    if ids and data_mix and os.path.isfile(data_mix):
        data = of_mix(data_mix)
        if differ(ids[0], data):
            raise ConfigError(f"stage.init_from: {ids[0].describe()} was trained with another tokenizer than "
                              f"the stage's data {data.describe()}; prepare the data with the checkpoint's "
                              "spm.model")
        ids.append(data)
    old = unchecked(ids)
    if old:
        log(f"warning: cannot check that one tokenizer was used: no tokenizer sha256 recorded in "
            f"{', '.join(old)} (saved by an older version)")


def check_model_data(meta: dict, ckpt: str, data_mix: str, log=print) -> None:
    """ValueError when the model's tokenizer is not the one the mixture's text ids were made with."""
    model, data = of_meta(meta, ckpt), of_mix(data_mix)
    old = unchecked([model, data])
    if old:
        log(f"warning: cannot check that the model and the data share a tokenizer: no tokenizer sha256 "
            f"recorded in {', '.join(old)} (saved by an older version)")
    if differ(model, data):
        raise ValueError(f"tokenizer mismatch: the model {model.describe()} was trained with another "
                         f"tokenizer than {data.describe()}; evaluate on data prepared with the model's "
                         "spm.model")
