"""Loading a model for evaluation and generation, with errors that say what to do.

    model, meta = load_model("runs/stage3")                     # run dir, tag dir, bundle dir, .safetensors
    model, meta, codec, tokenizer = load_everything("export/")  # + the codec and tokenizer of its data

The codec and tokenizer come from the checkpoint's meta (an exported bundle carries both: bundle.py);
`codec_checkpoint` and `tokenizer` override the recorded paths. A tokenizer whose sha256 differs from the
one the model was trained with is refused.
"""

from __future__ import annotations

import os

from training.checkpoint.manifest import CheckpointError


class ModelLoadError(RuntimeError):
    """A checkpoint, codec or tokenizer problem; the message says what to do."""


def load_model(ckpt: str):
    """-> (model, meta) via training.checkpoint.weights.load_for_inference."""
    from training.checkpoint.weights import load_for_inference

    if not os.path.exists(ckpt):
        raise ModelLoadError(f"--ckpt {ckpt} does not exist (give a run dir, a checkpoints/step_* dir or an "
                             f"exported model directory)")
    try:
        return load_for_inference(ckpt)
    except CheckpointError as e:  # no complete tag, missing/truncated files, a pickle file: the reason
        raise ModelLoadError(f"{e}; if a save was interrupted, the tag lacks its COMPLETE marker: use an "
                             f"older tag or resume the run") from None
    except (ValueError, KeyError, TypeError, NotImplementedError, RuntimeError) as e:
        raise ModelLoadError(f"{ckpt}: cannot load this checkpoint ({type(e).__name__}: {e}); it was written "
                             f"by an incompatible config or version") from None


def load_codec_for(model, meta: dict, ckpt: str, codec_checkpoint: str | None = None):
    from data_prep.codec import CodecUnavailable, load_codec_from_info

    info = meta.get("codec_info") or {}
    if not info:
        raise ModelLoadError(f"{ckpt}: the checkpoint meta records no codec (codec_info); cannot decode "
                             "audio")
    if int(info.get("num_codebooks", model.cfg.num_codebooks)) != model.cfg.num_codebooks:
        raise ModelLoadError(f"{ckpt}: the model predicts {model.cfg.num_codebooks} codebooks but its codec "
                             f"has {info['num_codebooks']}: incompatible checkpoint")
    try:
        return load_codec_from_info(info, checkpoint=codec_checkpoint, where=f"{ckpt} (its training data)")
    except (CodecUnavailable, ValueError) as e:
        hint = ("" if info.get("name") == "random"
                else " (--codec-checkpoint PATH: the weights the data was prepared with)")
        raise ModelLoadError(f"codec: {e}{hint}") from None


def load_tokenizer_for(model, meta: dict, ckpt: str, tokenizer: str | None = None):
    """The model's tokenizer (`tokenizer` overrides the recorded path), checked by sha256 and vocab size."""
    from data_prep.shards import sha256_file
    from data_prep.text import load_tokenizer

    path = tokenizer or meta.get("tokenizer_path")
    if not path or not os.path.isfile(path):
        where = "--tokenizer" if tokenizer else "the tokenizer it was trained with"
        raise ModelLoadError(f"{ckpt}: {where} ({path}) is missing; restore that spm.model or pass "
                             f"--tokenizer PATH")
    want = meta.get("tokenizer_sha256")
    if want:
        got = sha256_file(path)
        if got != want:
            raise ModelLoadError(f"tokenizer mismatch: {path} has sha256 {got[:12]}.. but {ckpt} was trained "
                                 f"with a tokenizer of sha256 {want[:12]}.. ({meta.get('tokenizer_path')}); "
                                 "pass --tokenizer with that spm.model")
    tok = load_tokenizer(path)
    if tok.vocab_size > model.cfg.text_vocab_size:
        raise ModelLoadError(f"{path} has {tok.vocab_size} pieces but the model was built for "
                             f"{model.cfg.text_vocab_size}: not the tokenizer of this checkpoint")
    return tok


def load_everything(ckpt: str, codec_checkpoint: str | None = None, tokenizer: str | None = None):
    """-> (model, meta, codec, tokenizer) with clear errors for missing/incomplete/incompatible inputs."""
    model, meta = load_model(ckpt)
    tok = load_tokenizer_for(model, meta, ckpt, tokenizer)
    return model, meta, load_codec_for(model, meta, ckpt, codec_checkpoint), tok
