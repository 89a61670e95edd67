"""`unimoe generate`: checkpoint -> sampled codes -> codec decode -> WAV.

    unimoe generate --ckpt RUN_DIR|CKPT_DIR|EXPORT_DIR --task speech --text "hello" --out a.wav
    unimoe generate --ckpt EXPORT_DIR --task music --text "a calm piano melody" --out b.wav --num 4

The checkpoint (a run dir, one ZeRO tag dir, an exported bundle directory or model.safetensors, via
training.checkpoint.inference.load_everything) records the codec and the sentencepiece model it was trained
with; both are loaded from there (an exported bundle holds both; `--codec-checkpoint` and `--tokenizer`
override the recorded paths).
Sampling is training.model.generate.generate (KV cache, per-task classifier-free guidance, top-k/top-p,
temperature); the same --seed gives the same audio.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from training.checkpoint.inference import ModelLoadError, load_everything

DEFAULT_MIN_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 10.0


class GenerateError(ModelLoadError):
    """A bad sampling argument; the message says what to do."""


def max_frames_for(model, codec, seconds: float, prompt_len: int) -> int:
    """Frames for `seconds` of audio, capped by what fits in the model's max_seq_len."""
    pattern = model.cfg.delays()
    frames = max(1, int(round(seconds * codec.frame_rate)))
    room = model.cfg.max_seq_len - prompt_len - 3 - pattern.max_delay
    return max(1, min(frames, room))


def decode_clip(codec, codes: torch.Tensor) -> np.ndarray:
    """codes [1, K, n] -> float32 mono audio; a peak over 1 (an untrained codec overshoots) is scaled to 1."""
    if codes.shape[-1] == 0:
        return np.zeros(0, dtype=np.float32)
    audio = codec.decode(codes)[0, 0].detach().cpu().numpy().astype(np.float32)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return audio / peak if peak > 1.0 else audio


def output_paths(out: str, num: int) -> list[str]:
    if num == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext or '.wav'}" for i in range(num)]


def generate_to_files(ckpt: str, task: str, text: str, out: str, num: int = 1, seed: int = 0,
                      cfg_scale: float | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, min_seconds: float | None = None, max_seconds: float | None = None,
                      codec_checkpoint: str | None = None, loaded=None, log=print,
                      progress: bool | None = None, tokenizer: str | None = None) -> list[str]:
    """Sample `num` clips and write them as WAV; returns the paths. `loaded`: load_everything()'s tuple."""
    import soundfile as sf

    from training.model.generate import generate

    if num < 1:
        raise GenerateError(f"--num must be >= 1, got {num}")
    model, meta, codec, tokenizer = loaded or load_everything(ckpt, codec_checkpoint, tokenizer)
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
        audio = decode_clip(codec, codes[i:i + 1, :, :n])
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
                          codec_checkpoint=args.codec_checkpoint, tokenizer=args.tokenizer)
    except ModelLoadError as e:
        print(f"unimoe generate: error: {e}", file=sys.stderr)
        return 2
    return 0
