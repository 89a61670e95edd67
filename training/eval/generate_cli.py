"""`unimoe generate`: checkpoint -> sampled codes -> codec decode -> WAV.

    unimoe generate --ckpt RUN_DIR|CKPT_DIR|model.safetensors --task speech --text "hello" --out a.wav
    unimoe generate --ckpt model.safetensors --task music --text "a calm piano melody" --out b.wav --num 4

The checkpoint (a run dir, one ZeRO tag dir or an exported model.safetensors, via
training.checkpoint.weights.load_for_inference) records the codec and the sentencepiece model it was trained
with; both are loaded from there (`--codec-checkpoint` points to the codec weights when they moved).
Sampling is training.model.generate.generate (KV cache, per-task classifier-free guidance, top-k/top-p,
temperature); the same --seed gives the same audio.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

DEFAULT_MIN_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 10.0


class GenerateError(RuntimeError):
    """A checkpoint, codec or tokenizer problem; the message says what to do."""


def load_checkpoint(ckpt: str):
    """-> (model, meta) via training.checkpoint.weights.load_for_inference; errors say what is wrong."""
    from training.checkpoint.manifest import CheckpointError
    from training.checkpoint.weights import load_for_inference

    if not os.path.exists(ckpt):
        raise GenerateError(f"--ckpt {ckpt} does not exist (give a run dir, a checkpoints/step_* dir or an "
                            f"exported model.safetensors)")
    try:
        return load_for_inference(ckpt)
    except CheckpointError as e:  # no complete tag, missing/truncated files, a pickle file: the reason
        raise GenerateError(f"{e}; if a save was interrupted, the tag lacks its COMPLETE marker: use an "
                            f"older tag or resume the run") from None
    except (ValueError, KeyError, TypeError, NotImplementedError, RuntimeError) as e:
        raise GenerateError(f"{ckpt}: cannot load this checkpoint ({type(e).__name__}: {e}); it was written "
                            f"by an incompatible config or version") from None


def load_everything(ckpt: str, codec_checkpoint: str | None = None):
    """-> (model, meta, codec, tokenizer) with clear errors for missing/incomplete/incompatible inputs."""
    from data_prep.codec import CodecUnavailable, load_codec_from_info
    from data_prep.text import load_tokenizer

    model, meta = load_checkpoint(ckpt)
    info = meta.get("codec_info") or {}
    if not info:
        raise GenerateError(f"{ckpt}: the checkpoint meta records no codec (codec_info); cannot decode audio")
    if int(info.get("num_codebooks", model.cfg.num_codebooks)) != model.cfg.num_codebooks:
        raise GenerateError(f"{ckpt}: the model predicts {model.cfg.num_codebooks} codebooks but its codec "
                            f"has {info['num_codebooks']}: incompatible checkpoint")
    try:
        codec = load_codec_from_info(info, checkpoint=codec_checkpoint, where=f"{ckpt} (its training data)")
    except (CodecUnavailable, ValueError) as e:
        hint = ("" if info.get("name") == "random"
                else " (--codec-checkpoint PATH: the weights the data was prepared with)")
        raise GenerateError(f"codec: {e}{hint}") from None
    tok_path = meta.get("tokenizer_path")
    if not tok_path or not os.path.exists(tok_path):
        raise GenerateError(f"{ckpt}: the tokenizer it was trained with ({tok_path}) is missing; "
                            f"restore that spm.model")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > model.cfg.text_vocab_size:
        raise GenerateError(f"{tok_path} has {tokenizer.vocab_size} pieces but the model was built for "
                            f"{model.cfg.text_vocab_size}: not the tokenizer of this checkpoint")
    return model, meta, codec, tokenizer


def max_frames_for(model, codec, seconds: float, prompt_len: int) -> int:
    """Frames for `seconds` of audio, capped by what fits in the model's max_seq_len."""
    pattern = model.cfg.delays()
    frames = max(1, int(round(seconds * codec.frame_rate)))
    room = model.cfg.max_seq_len - prompt_len - 3 - pattern.max_delay
    return max(1, min(frames, room))


def output_paths(out: str, num: int) -> list[str]:
    if num == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext or '.wav'}" for i in range(num)]


def generate_to_files(ckpt: str, task: str, text: str, out: str, num: int = 1, seed: int = 0,
                      cfg_scale: float | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, min_seconds: float | None = None, max_seconds: float | None = None,
                      codec_checkpoint: str | None = None, loaded=None, log=print,
                      progress: bool | None = None) -> list[str]:
    """Sample `num` clips and write them as WAV; returns the paths. `loaded`: load_everything()'s tuple."""
    import soundfile as sf

    from training.model.generate import generate

    if num < 1:
        raise GenerateError(f"--num must be >= 1, got {num}")
    model, meta, codec, tokenizer = loaded or load_everything(ckpt, codec_checkpoint)
    ids = [int(i) for i in tokenizer.encode(text)]
    max_s = DEFAULT_MAX_SECONDS if max_seconds is None else max_seconds
    min_s = min(DEFAULT_MIN_SECONDS, max_s) if min_seconds is None else min_seconds
    if not 0 <= min_s <= max_s or max_s <= 0:
        raise GenerateError(f"need 0 <= --min-seconds <= --max-seconds and --max-seconds > 0, "
                            f"got {min_s} and {max_s}")
    max_frames = max_frames_for(model, codec, max_s, len(ids))
    min_frames = min(max_frames, int(round(min_s * codec.frame_rate)))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    codes, lengths = generate(model, task, [ids] * num, max_frames=max_frames, min_frames=min_frames,
                              temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                              generator=gen, return_lengths=True,
                              progress=num * max_frames > 200 if progress is None else progress)
    paths = output_paths(out, num)
    for i, path in enumerate(paths):
        n = int(lengths[i])
        wav = codec.decode(codes[i:i + 1, :, :n]) if n > 0 else torch.zeros(1, 1, 0)
        audio = wav[0, 0].detach().cpu().numpy().astype(np.float32)
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak > 1.0:  # an untrained codec can overshoot; keep the WAV valid
            audio = audio / peak
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        sf.write(path, audio, codec.sample_rate, subtype="PCM_16")
        seconds = audio.size / codec.sample_rate
        log(f"wrote {path}: {task}, {n} frames = {seconds:.2f} s at {codec.sample_rate} Hz")
    if not codec.trained:
        log(f"note: the codec is randomly initialised (untrained {codec.name} architecture): the audio is "
            "noise-like; prepare data with a real codec checkpoint for real sound")
    return paths


def run_cli(args) -> int:
    try:
        generate_to_files(args.ckpt, args.task, args.text, args.out, num=args.num, seed=args.seed,
                          cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                          codec_checkpoint=args.codec_checkpoint)
    except GenerateError as e:
        print(f"unimoe generate: error: {e}", file=sys.stderr)
        return 2
    return 0
