"""Audio decoding, checks, mono downmix and resampling (numpy + soundfile only, no torch, no torchaudio).

This module runs inside the `--workers` decode pool, so it must stay light to import.
`load_checked(path, cfg)` returns float32 mono samples at `cfg.sample_rate` or raises `AudioError` whose
message is the reason written to prep_report.json.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf


class AudioError(Exception):
    """An audio file that cannot be used; str(err) is the reason for the report."""


@dataclass(frozen=True)
class AudioCheckConfig:
    sample_rate: int = 24000  # target rate (the codec's)
    min_seconds: float = 0.2
    max_seconds: float = 30.0

    def __post_init__(self):
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {self.sample_rate}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(
                f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}"
            )


def _wav_truncation(path: str) -> str | None:
    """For RIFF/WAVE files: a reason if the data chunk declares more bytes than the file holds.

    libsndfile silently shortens truncated WAVs to what is on disk, so this is checked by hand.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, clen = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                if clen in (0, 0xFFFFFFFF):  # streamed WAV: length unknown
                    return None
                have = size - pos - 8
                if clen > have:
                    return f"truncated WAV: data chunk declares {clen} bytes, file holds {have}"
                return None
            pos += 8 + clen + (clen & 1)
    return None


def decode(path: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read a file as float32 [frames, channels] and its sample rate, or raise AudioError.
    With max_seconds, a longer file is rejected from its header, before reading it."""
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"audio path is a directory: {path}")
    if os.path.getsize(path) == 0:
        raise AudioError("zero-length audio (empty file)")
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile: format not recognised, no data chunk, ...
        raise AudioError(f"not decodable audio ({type(e).__name__}: {_one_line(e)})") from None
    if max_seconds is not None and info.duration > max_seconds:
        raise AudioError(f"too long: {info.duration:.2f} s > max {max_seconds} s")
    reason = _wav_truncation(path)
    if reason:
        raise AudioError(reason)
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"corrupt audio, decoding failed ({type(e).__name__}: {_one_line(e)})") from None
    if info.frames > 0 and wav.shape[0] < info.frames:
        raise AudioError(f"truncated audio: header says {info.frames} frames, decoded {wav.shape[0]}")
    return wav, sr


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def to_mono(wav: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames] by averaging channels."""
    return wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]


@lru_cache(maxsize=16)
def _sinc_filters(up: int, down: int, zeros: int, rolloff: float) -> tuple[np.ndarray, int]:
    """Polyphase windowed-sinc filters [up, 2W+1] for resampling by up/down, and W (taps per side)."""
    cutoff = rolloff * min(1.0, up / down)  # fraction of the input Nyquist
    width = int(math.ceil(zeros / cutoff))
    taps = np.arange(-width, width + 1, dtype=np.float64)
    # output sample n sits at input position n * down / up = base + phase / up, phase in [0, up)
    d = taps[None, :] - np.arange(up, dtype=np.float64)[:, None] / up  # distance in input samples
    window = np.where(np.abs(d) <= width, np.cos(np.pi * d / (2 * width)) ** 2, 0.0)  # Hann
    filters = cutoff * np.sinc(cutoff * d) * window
    return filters.astype(np.float32), width


def resample(x: np.ndarray, sr_in: int, sr_out: int, zeros: int = 16, rolloff: float = 0.945) -> np.ndarray:
    """Band-limited resampling of a 1-D float signal (windowed sinc, polyphase, zero padded edges)."""
    if sr_in == sr_out:
        return x.astype(np.float32, copy=False)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    filters, width = _sinc_filters(up, down, zeros, rolloff)
    n_out = int(math.ceil(len(x) * up / down))
    xp = np.pad(x.astype(np.float32, copy=False), (width, width + 1))
    out = np.empty(n_out, dtype=np.float32)
    offsets = np.arange(2 * width + 1)
    step = 16384  # output samples per chunk: bounds the [chunk, taps] gather in memory
    for start in range(0, n_out, step):
        n = np.arange(start, min(n_out, start + step), dtype=np.int64)
        base, phase = np.divmod(n * down, up)
        frames = xp[base[:, None] + offsets[None, :]]  # [chunk, 2W+1]; xp index width == x index 0
        out[start : start + len(n)] = np.einsum("ij,ij->i", frames, filters[phase])
    return out


def load_checked(path: str, cfg: AudioCheckConfig) -> np.ndarray:
    """Decode, check and convert one file: float32 mono at cfg.sample_rate. Raises AudioError."""
    wav, sr = decode(path, cfg.max_seconds)
    if wav.shape[0] == 0:
        raise AudioError("zero-length audio (no samples)")
    if not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).sum())
        raise AudioError(f"non-finite samples: {bad} NaN/inf values")
    seconds = wav.shape[0] / sr
    if seconds < cfg.min_seconds:
        raise AudioError(f"too short: {seconds:.3f} s < min {cfg.min_seconds} s")
    if seconds > cfg.max_seconds:
        raise AudioError(f"too long: {seconds:.2f} s > max {cfg.max_seconds} s")
    return resample(to_mono(wav), sr, cfg.sample_rate)


def load_job(job: tuple[int, str, AudioCheckConfig]) -> tuple[int, np.ndarray | None, str | None]:
    """Pool entry point: (index, samples or None, reason or None); never raises for bad audio."""
    index, path, cfg = job
    try:
        return index, load_checked(path, cfg), None
    except AudioError as e:
        return index, None, str(e)
    except Exception as e:  # anything else from a broken file is still a per-item rejection
        return index, None, f"unreadable audio ({type(e).__name__}: {_one_line(e)})"
