"""Audio decoding, checks, segments, mono downmix and resampling (numpy, soundfile, soxr; no torch).

This module runs inside the `--workers` decode processes, so it must stay light to import.
`load_segments(job)` returns the float32 mono pieces at `cfg.sample_rate` that one manifest line becomes, or
raises `AudioError` whose message is the reason written to prep_report.json:
- `start`/`end` (seconds, from the manifest) select a segment of a long file; only that part is read.
- music longer than `max_seconds` is cut into windows of at most `max_seconds`, one every `window_hop`
  seconds (default: `max_seconds`, no overlap); a last window shorter than `min_seconds` is dropped.
- speech longer than `max_seconds` is rejected (a transcript cannot be cut with the audio): the reason says
  to give `start`/`end`.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # a WAV written as a stream leaves its chunk sizes at one of these
END_TOLERANCE_S = 0.05  # a manifest `end` this far past the file's end is clamped, not rejected


class AudioError(Exception):
    """An audio file that cannot be used; str(err) is the reason for the report."""


@dataclass(frozen=True)
class AudioCheckConfig:
    sample_rate: int = 24000  # target rate (the codec's)
    min_seconds: float = 0.2
    max_seconds: float = 30.0
    window_hop: float | None = None  # music over max_seconds: a window every window_hop s (None: max_seconds)

    def __post_init__(self):
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {self.sample_rate}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(
                f"need 0 <= min_seconds < max_seconds, got {self.min_seconds} and {self.max_seconds}"
            )
        if self.window_hop is not None and not 0 < self.window_hop <= self.max_seconds:
            raise ValueError(f"window_hop must be in (0, max_seconds], got {self.window_hop}")


@dataclass(frozen=True)
class DecodeJob:
    """What a decode worker needs for one manifest line."""

    path: str
    task: str
    cfg: AudioCheckConfig
    start: float | None = None
    end: float | None = None


def _wav_truncation(path: str) -> str | None:
    """For RIFF/WAVE files: a reason if the header declares more bytes than the file holds.

    libsndfile silently shortens truncated WAVs to what is on disk, so this is checked by hand. A data chunk
    of unknown size (a WAV written as a stream) is checked against the RIFF size when that one is known, and
    its bytes must make whole frames.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        riff_size = struct.unpack("<I", head[4:8])[0]
        block_align = None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, clen = struct.unpack("<4sI", f.read(8))
            if cid == b"fmt " and clen >= 14:
                block_align = struct.unpack("<H", f.read(14)[12:14])[0]
            if cid == b"data":
                have = size - pos - 8
                if clen not in UNKNOWN_SIZES:
                    if clen > have:
                        return f"truncated WAV: data chunk declares {clen} bytes, file holds {have}"
                    return None
                if riff_size not in UNKNOWN_SIZES and riff_size + 8 > size:
                    return (
                        f"truncated WAV: data size unknown (0x{clen:X}) and the RIFF header declares "
                        f"{riff_size + 8} bytes, file holds {size}"
                    )
                if block_align and have % block_align:
                    return (f"truncated WAV: data size unknown and {have} bytes is not a whole number of "
                            "frames")
                return None
            pos += 8 + clen + (clen & 1)
    return None


def _info(path: str):
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"audio path is a directory: {path}")
    if os.path.getsize(path) == 0:
        raise AudioError("zero-length audio (empty file)")
    try:
        return sf.info(path)
    except Exception as e:  # libsndfile: format not recognised, no data chunk, ...
        raise AudioError(f"not decodable audio ({type(e).__name__}: {_one_line(e)})") from None


def _segment(info, start: float | None, end: float | None) -> tuple[int, int]:
    """[first, stop) frames of the file selected by the manifest's start/end (seconds)."""
    duration = info.frames / info.samplerate
    if start is None and end is None:
        return 0, info.frames
    s = 0.0 if start is None else start
    e = duration if end is None else end
    if e > duration + END_TOLERANCE_S:
        raise AudioError(f"segment end {e:.2f} s is past the end of the audio ({duration:.2f} s)")
    if s >= duration:
        raise AudioError(f"segment start {s:.2f} s is past the end of the audio ({duration:.2f} s)")
    return int(round(s * info.samplerate)), min(info.frames, int(round(e * info.samplerate)))


def decode(path: str, max_seconds: float | None = None, start: float | None = None,
           end: float | None = None) -> tuple[np.ndarray, int]:
    """Read a file (or its [start, end) segment) as float32 [frames, channels] and its sample rate, or raise
    AudioError. With max_seconds, a longer selection is rejected from the header, before reading it."""
    info = _info(path)
    first, stop = _segment(info, start, end)
    seconds = (stop - first) / info.samplerate
    if max_seconds is not None and seconds > max_seconds:
        hint = (
            "select a shorter start/end segment"
            if start is not None or end is not None
            else "speech is not cut into windows: give start/end (seconds) in the manifest to select a "
            "segment"
        )
        raise AudioError(f"too long: {seconds:.2f} s > max {max_seconds} s ({hint})")
    reason = _wav_truncation(path)
    if reason:
        raise AudioError(reason)
    try:
        wav, sr = sf.read(path, start=first, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"corrupt audio, decoding failed ({type(e).__name__}: {_one_line(e)})") from None
    if info.frames > 0 and wav.shape[0] < stop - first:
        raise AudioError(f"truncated audio: header says {stop - first} frames, decoded {wav.shape[0]}")
    return wav, sr


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def to_mono(wav: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames] by averaging channels."""
    return wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of a 1-D float signal with libsoxr (its "HQ" quality: 20-bit precision,
    passband to 91 % of the lower Nyquist). Length: round(len(x) * sr_out / sr_in)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    return soxr.resample(x, sr_in, sr_out, quality="HQ")


def windows(x: np.ndarray, sample_rate: int, max_seconds: float, hop_seconds: float | None,
            min_seconds: float) -> list[np.ndarray]:
    """Cut x into windows of at most max_seconds, one every hop_seconds, up to the one that reaches the end;
    a last window shorter than min_seconds is dropped."""
    size = int(math.floor(max_seconds * sample_rate))
    if len(x) <= size:
        return [x]
    hop = int(math.floor((hop_seconds or max_seconds) * sample_rate))
    out = []
    for first in range(0, len(x), hop):
        piece = x[first : first + size]
        if len(piece) >= min_seconds * sample_rate:
            out.append(piece)
        if first + size >= len(x):
            break
    return out


def load_segments(job: DecodeJob) -> list[np.ndarray]:
    """Decode, check and convert one manifest line: float32 mono pieces at cfg.sample_rate (one, or the
    windows of long music). Raises AudioError."""
    cfg = job.cfg
    cut = job.task == "music"
    wav, sr = decode(job.path, None if cut else cfg.max_seconds, job.start, job.end)
    if wav.shape[0] == 0:
        raise AudioError("zero-length audio (no samples)")
    if not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).sum())
        raise AudioError(f"non-finite samples: {bad} NaN/inf values")
    seconds = wav.shape[0] / sr
    if seconds < cfg.min_seconds:
        raise AudioError(f"too short: {seconds:.3f} s < min {cfg.min_seconds} s")
    x = resample(to_mono(wav), sr, cfg.sample_rate)
    pieces = [x] if not cut else windows(x, cfg.sample_rate, cfg.max_seconds, cfg.window_hop, cfg.min_seconds)
    if not pieces:  # cannot happen for x >= min_seconds; kept so that no line vanishes without a reason
        raise AudioError(f"no window of at least {cfg.min_seconds} s")
    return pieces


def load_checked(path: str, cfg: AudioCheckConfig) -> np.ndarray:
    """One file as float32 mono at cfg.sample_rate, within the length bounds (no windows).
    Raises AudioError."""
    return load_segments(DecodeJob(path, "speech", cfg))[0]


def load_job(job: DecodeJob) -> tuple[list[np.ndarray] | None, str | None]:
    """Worker entry point: (pieces or None, reason or None); never raises for bad audio."""
    try:
        return load_segments(job), None
    except AudioError as e:
        return None, str(e)
    except Exception as e:  # anything else from a broken file is still a per-item rejection
        return None, f"unreadable audio ({type(e).__name__}: {_one_line(e)})"
