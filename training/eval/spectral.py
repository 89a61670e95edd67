"""Spectral distances between a reference clip and its reconstruction (a codec round trip, a model output).

    spectral_scores(ref, out, sr)  -> {"sc": float | None, "lsd_db": float | None, "reason": str | None}
    clip_problem(wav, sr)          -> why a clip cannot be scored (silent, non-finite, too short), or None

- SC, spectral convergence: || |S_ref| - |S_out| ||_F / || |S_ref| ||_F over the whole clip (0 is perfect;
  a reconstruction of unrelated sound of the same level is ~1.4);
- LSD, log-spectral distance in dB: per frame, the RMS over frequency of 10 log10 P_ref - 10 log10 P_out,
  averaged over frames; powers are floored 80 dB under the reference's peak (a band the reference lacks,
  or a silent stretch, costs at most 80 dB and no division by zero).
STFT: 1024-point Hann window, hop 256, at the clips' own sample rate; `out` is cut (or zero-padded) to the
reference's length. A clip that cannot be scored gives None with the reason, never an exception.
"""

from __future__ import annotations

import numpy as np
import torch

N_FFT, HOP = 1024, 256
FLOOR_DB = 80.0
SILENCE_RMS = 1e-5  # below this (about -100 dBFS) a clip is treated as digital silence
MIN_SECONDS = 0.1


def clip_problem(wav: np.ndarray, sr: int, min_seconds: float = MIN_SECONDS) -> str | None:
    """The reason a mono clip cannot be scored, or None."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        return f"expected a mono clip, got shape {wav.shape}"
    if not np.isfinite(wav).all():
        return f"non-finite samples ({int((~np.isfinite(wav)).sum())} NaN/inf)"
    if len(wav) < max(min_seconds * sr, N_FFT):
        return f"too short ({len(wav) / sr:.3f} s; at least {max(min_seconds, N_FFT / sr):.3f} s)"
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms < SILENCE_RMS:
        return f"silent (RMS {rms:.1e} < {SILENCE_RMS:.0e})"
    return None


def _power(wav: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float64))
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    return torch.stft(x, N_FFT, HOP, window=window, center=True, return_complex=True).abs().pow(2)


def spectral_scores(ref: np.ndarray, out: np.ndarray, sr: int) -> dict:
    """SC and LSD of `out` against `ref` (mono, same sample rate); None with a reason where undefined."""
    problem = clip_problem(ref, sr)
    if problem is None and not np.isfinite(np.asarray(out)).all():
        problem = "the reconstruction has non-finite samples"
    if problem is not None:
        return {"sc": None, "lsd_db": None, "reason": problem}
    out = np.asarray(out)[: len(ref)]
    out = np.pad(out, (0, len(ref) - len(out)))
    p_ref, p_out = _power(ref), _power(out)
    sc = (p_ref.sqrt() - p_out.sqrt()).norm() / p_ref.sqrt().norm()
    floor = p_ref.max() * 10.0 ** (-FLOOR_DB / 10)
    diff = 10 * torch.log10(p_ref.clamp_min(floor)) - 10 * torch.log10(p_out.clamp_min(floor))
    lsd = diff.pow(2).mean(0).sqrt().mean()
    return {"sc": round(float(sc), 4), "lsd_db": round(float(lsd), 3), "reason": None}
