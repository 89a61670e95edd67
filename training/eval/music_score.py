"""Caption adherence of a music clip, from the signal: does it have the instrument, key, mode, tempo and
drums its caption states? (the `metrics` extra: librosa)

    from training.eval.music_score import music_scores
    music_scores(wav, sr, "a calm piano melody in A minor, 72 bpm")
    # {"music_score": 0.75, "matches": {"instrument": True, "key": True, "mode": True, "tempo": False},
    #  "estimated": {...}, "stated": {...}, "reason": None}

What the demo's captions state is what data_prep/music.py renders from a Piece: an instrument (one of six
additive-synthesis timbres), a key and mode, a tempo in bpm (or only a pace: slow < 85 <= moderate < 125 <=
fast) and, for 40% of the pieces, "over a soft drum beat" (a demo caption without it has no drums).
From the signal:
- key and mode: the mean chroma correlated with the Krumhansl-Kessler profiles, the best of 24 keys;
- tempo: librosa's onset-autocorrelation tempo; a match is within 10% of the stated bpm or of its half or
  double (MIREX "Accuracy 2"); with only a pace stated, the pace of the estimate;
- instrument and drums: nearest class mean (Mahalanobis, pooled covariance) over MFCC, spectral contrast,
  flatness and envelope statistics, the class means fitted once per process (~5 s) on pieces rendered by
  data_prep.music with a fixed seed, so nothing is downloaded and the result is deterministic.
music_score = the fraction of the stated attributes that match. A clip too short, silent, clipped or
non-finite gets None with the reason. On rendered references it is ~0.8; a clip that ignores its caption
scores at the level of references scored against another item's caption (evaluate reports that floor).
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np

from data_prep.music import INSTRUMENTS, NOTE_NAMES, random_piece, render
from training.eval.audio_metrics import INSTALL_HINT, clip_problem, default_numba_cache

SR = 22050
MIN_SECONDS = 1.0
TEMPO_TOLERANCE = 0.10
FIT_PIECES, FIT_SEED = 60, 1234
# Krumhansl-Kessler key profiles, C major / C minor
MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_PITCH = {**{n: i for i, n in enumerate(NOTE_NAMES)}, "Db": 1, "D#": 3, "Gb": 6, "G#": 8, "A#": 10}


def pace_of(bpm: float) -> str:
    return "slow" if bpm < 85 else ("moderate" if bpm < 125 else "fast")


def caption_attributes(caption: str) -> dict:
    """What a demo-style caption states: instrument, key (0 = C), mode, tempo (bpm), pace, drums."""
    text = caption.lower()
    out = {}
    for name in sorted(INSTRUMENTS, key=len, reverse=True):
        if re.search(rf"\b{name}\b", text):
            out["instrument"] = name
            break
    m = re.search(r"\b([a-g](?:#|b)?) (major|minor)\b", text)
    if m:
        out["key"], out["mode"] = _PITCH[m.group(1).capitalize()], m.group(2)
    m = re.search(r"(\d+(?:\.\d+)?)\s*bpm", text)
    if m:
        out["tempo"] = float(m.group(1))
    else:
        m = re.search(r"\b(slow|moderate|fast)\b", text)
        if m:
            out["pace"] = m.group(1)
    if "instrument" in out:  # a demo caption: the beat is stated when there is one
        out["drums"] = "drum" in text
    return out


def _spectra(y: np.ndarray):
    import librosa

    S = np.abs(librosa.stft(y, n_fft=2048, hop_length=512))
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(S=S ** 2, sr=SR))
    return S, mel_db


def timbre_features(y: np.ndarray) -> np.ndarray:
    """MFCC mean/std/delta, spectral contrast, flatness, onset and loudness-envelope statistics."""
    import librosa

    S, mel_db = _spectra(y)
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=20)
    contrast = librosa.feature.spectral_contrast(S=S, sr=SR)
    flat = librosa.feature.spectral_flatness(S=S)
    rms = librosa.feature.rms(S=S)[0]
    onset = librosa.onset.onset_strength(S=mel_db, sr=SR)
    low = S[:12].sum(0)  # below ~130 Hz: the kick
    stats = [np.log(flat.mean() + 1e-9), onset.std() / (onset.mean() + 1e-9), np.std(np.log(rms + 1e-6)),
             np.log(np.abs(np.diff(rms)).mean() / (rms.mean() + 1e-9) + 1e-9),
             np.maximum(np.diff(low), 0).mean() / (low.mean() + 1e-9)]
    return np.concatenate([mfcc.mean(1)[1:], mfcc.std(1)[1:], np.abs(np.diff(mfcc, axis=1)).mean(1)[1:6],
                           contrast.mean(1), stats])


class _Classifier:
    """Nearest class mean under the pooled within-class covariance (shrunk), on standardised features."""

    def __init__(self, x: np.ndarray, labels: list):
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-9
        xs = (x - self.mu) / self.sd
        self.classes = sorted(set(labels), key=str)
        masks = [np.array([lab == c for lab in labels]) for c in self.classes]
        self.means = np.stack([xs[m].mean(0) for m in masks])
        within = sum(np.cov(xs[m].T) for m in masks) / len(masks)
        self.inv = np.linalg.inv(within + 0.1 * np.eye(x.shape[1]))

    def predict(self, f: np.ndarray):
        d = (f - self.mu) / self.sd - self.means
        return self.classes[int(np.argmin(np.einsum("ci,ij,cj->c", d, self.inv, d)))]


@functools.lru_cache(maxsize=1)
def _classifiers() -> dict:
    rng = np.random.default_rng(FIT_SEED)
    pieces = [random_piece(rng) for _ in range(FIT_PIECES)]
    for i, p in enumerate(pieces):  # every instrument equally often
        p.instrument = list(INSTRUMENTS)[i % len(INSTRUMENTS)]
    feats = np.stack([timbre_features(render(p, rng, SR)) for p in pieces])
    return {"instrument": _Classifier(feats, [p.instrument for p in pieces]),
            "drums": _Classifier(feats, [p.drums for p in pieces])}


def estimate_key(y: np.ndarray) -> tuple[int, str]:
    import librosa

    chroma = librosa.feature.chroma_cqt(y=y, sr=SR, hop_length=1024).mean(1)
    best = max((np.corrcoef(chroma, np.roll(prof, k))[0, 1], k, mode)
               for mode, prof in (("major", MAJOR), ("minor", MINOR)) for k in range(12))
    return best[1], best[2]


def estimate_tempo(y: np.ndarray) -> float:
    import librosa

    onset = librosa.onset.onset_strength(y=y, sr=SR)
    return float(librosa.feature.tempo(onset_envelope=onset, sr=SR)[0])


def analyse(y: np.ndarray) -> dict:
    """Everything a caption can state, estimated from a clip at 22.05 kHz."""
    clf = _classifiers()
    f = timbre_features(y)
    key, mode = estimate_key(y)
    tempo = estimate_tempo(y)
    return {"instrument": clf["instrument"].predict(f), "drums": bool(clf["drums"].predict(f)),
            "key": key, "mode": mode, "tempo": round(tempo, 1), "pace": pace_of(tempo)}


def _tempo_match(est: float, stated: float) -> bool:
    return min(abs(est * f / stated - 1) for f in (1.0, 0.5, 2.0)) <= TEMPO_TOLERANCE


def match(stated: dict, est: dict) -> dict:
    out = {}
    for attr, value in stated.items():
        out[attr] = _tempo_match(est["tempo"], value) if attr == "tempo" else est[attr] == value
    return out


def music_scores(wav, sr: int, caption: str) -> dict:
    """Caption adherence (fraction of stated attributes found in the signal); None with a reason when the
    clip cannot be scored or the caption states nothing this score reads."""
    out = {"music_score": None, "matches": None, "estimated": None, "stated": caption_attributes(caption),
           "reason": None}
    wav = np.asarray(wav, dtype=np.float32)
    problem = clip_problem(wav, sr, MIN_SECONDS)
    if problem or not out["stated"]:
        return {**out, "reason": problem or "the caption states no instrument, key, tempo or pace"}
    try:
        default_numba_cache()
        import soxr

        y = wav if sr == SR else soxr.resample(wav, sr, SR).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["estimated"] = analyse(y)
    except ImportError:
        return {**out, "reason": INSTALL_HINT}
    out["matches"] = match(out["stated"], out["estimated"])
    out["music_score"] = float(np.mean(list(out["matches"].values())))
    return out
