"""Speech quality and intelligibility of a clip, offline: DNSMOS and WER/CER (the `metrics` extra).

    from training.eval.audio_metrics import speech_scores
    speech_scores(wav, sr, text="the pilot repaired the bridge")
    # {"dnsmos": 2.9, "dnsmos_sig": .., "dnsmos_bak": .., "dnsmos_p808": .., "wer": 0.0, "cer": 0.0,
    #  "transcript": "the pilot repaired the bridge", "reasons": {}}

- DNSMOS (speechmos: Microsoft's DNSMOS ONNX models, shipped in its wheel) on the clip at 16 kHz in [-1, 1].
- WER/CER (jiwer) of a pocketsphinx transcript against the text. The language model is built from the texts
  being evaluated (SphinxASR(texts)), which is what makes espeak-ng speech score a few % WER; a seeded noise
  floor (3e-3 RMS, -50 dBFS) keeps pocketsphinx deterministic on digital silence.
- A clip that is non-finite, too short, silent or clipped gets None with the reason in "reasons", and so
  does every score when the extra is not installed: never an exception, never a number from a bad clip.

Own models, local paths only (nothing is ever downloaded): SphinxASR(texts, model_dir=DIR) takes another
pocketsphinx acoustic model (a folder with mdef, means, ...; DIR/*.dict as its dictionary); a plug-in
`module:function` (see load_scorer) can wrap any local ASR or CLAP weights.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import tempfile

import numpy as np

DNSMOS_SR = 16000
MIN_SECONDS = 0.3
SILENCE_RMS = 1e-4  # -80 dBFS
CLIPPED_FRACTION = 0.01  # more than 1% of the samples at or beyond full scale
# Seeded noise under the speech before pocketsphinx: deterministic on digital silence, and less sensitive to
# the digital silence espeak-ng leaves around words (40 demo-corpus clips, 8 voices: WER 18% at 3e-4 RMS,
# 12% at 1e-3, 7% at 3e-3, 8% at 1e-2).
NOISE_FLOOR_RMS = 3e-3
INSTALL_HINT = "the metrics extra is not installed (pip install 'unimoe-audio[metrics]')"


def default_numba_cache() -> None:
    """librosa's numba functions compile once per machine instead of once per process (~20 s)."""
    base = os.environ.get("UNIMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unimoe-audio")
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(base, "numba"))


def clip_problem(wav: np.ndarray, sr: int, min_seconds: float = MIN_SECONDS, silence_rms: float = SILENCE_RMS,
                 clipping: bool = True) -> str | None:
    """Why a clip cannot be scored (non-finite, too short, silent, clipped), or None when it can."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        return f"expected a mono clip (1-d array), got shape {tuple(wav.shape)}"
    if not np.isfinite(wav).all():
        return f"non-finite samples ({int((~np.isfinite(wav)).sum())} NaN/inf)"
    if wav.size < min_seconds * sr:
        return f"too short ({wav.size / sr:.2f} s < {min_seconds} s)"
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms < silence_rms:
        return f"silent (RMS {rms:.1e} < {silence_rms:g})"
    full = float(np.mean(np.abs(wav) >= 0.999)) if clipping else 0.0
    if full > CLIPPED_FRACTION:
        return f"clipped ({100 * full:.1f}% of samples at full scale)"
    return None


def to_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    import soxr

    wav = np.asarray(wav, dtype=np.float32)
    out = wav if sr == DNSMOS_SR else soxr.resample(wav, sr, DNSMOS_SR).astype(np.float32)
    return np.clip(out, -1.0, 1.0)


def dnsmos(wav16k: np.ndarray) -> dict:
    """DNSMOS overall / signal / background and P.808 MOS of a 16 kHz clip (ImportError without the extra)."""
    default_numba_cache()
    from speechmos import dnsmos as _dnsmos

    r = _dnsmos.run(wav16k, DNSMOS_SR)
    return {"dnsmos": float(r["ovrl_mos"]), "dnsmos_sig": float(r["sig_mos"]),
            "dnsmos_bak": float(r["bak_mos"]), "dnsmos_p808": float(r["p808_mos"])}


def normalize_text(text: str) -> str:
    """Lower case, letters and apostrophes only, single spaces: what WER compares and the LM is built from."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def wer_cer(reference: str, hypothesis: str) -> tuple[float, float]:
    import jiwer

    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        raise ValueError("empty reference text")
    return float(jiwer.wer(ref, hyp)), float(jiwer.cer(ref, hyp))


def _dictionary_lines(path: str, words: set[str]) -> list[str]:
    """The pronunciations of `words` only (loading all 135k cmudict entries costs seconds per decoder);
    a British spelling missing from the dictionary (harbour) takes the American one's (harbor)."""
    entries: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            head, _, phones = line.partition(" ")
            entries.setdefault(head.split("(")[0], []).append(phones.strip())
    out = []
    for w in sorted(words):
        for i, phones in enumerate(entries.get(w) or entries.get(w.replace("our", "or")) or []):
            out.append(f"{w}{f'({i + 1})' if i else ''} {phones}\n")
    return out


class SphinxASR:
    """pocketsphinx with a trigram LM built from `texts` (the texts being evaluated).

    model_dir: a local pocketsphinx acoustic model folder (default: the en-us model in the wheel); its
    *.dict file, when there is one, is the pronunciation dictionary."""

    def __init__(self, texts: list[str], model_dir: str | None = None):
        from pocketsphinx import Decoder, get_model_path
        from pocketsphinx.lm import ArpaBoLM

        lines = sorted({normalize_text(t) for t in texts} - {""})
        if not lines:
            raise ValueError("SphinxASR needs at least one non-empty text for its language model")
        kwargs, dict_path = {}, os.path.join(get_model_path(), "en-us", "cmudict-en-us.dict")
        if model_dir is not None:
            if not os.path.isdir(model_dir):
                raise FileNotFoundError(f"ASR model folder {model_dir} does not exist (a local pocketsphinx "
                                        f"acoustic model: mdef, means, variances, ...)")
            kwargs["hmm"] = model_dir
            dict_path = (sorted(glob.glob(os.path.join(model_dir, "*.dict"))) or [dict_path])[0]
        lm = ArpaBoLM(text="\n".join(f"<s> {line} </s>" for line in lines))
        lm.compute()
        with tempfile.TemporaryDirectory() as tmp:
            lm.write_file(os.path.join(tmp, "lm.arpa"))
            with open(os.path.join(tmp, "words.dict"), "w", encoding="utf-8") as f:
                f.writelines(_dictionary_lines(dict_path, {w for line in lines for w in line.split()}))
            self.decoder = Decoder(lm=os.path.join(tmp, "lm.arpa"), dict=os.path.join(tmp, "words.dict"),
                                   loglevel="FATAL", **kwargs)

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        x = to_16k(wav, sr).astype(np.float64)
        x = x + np.random.default_rng(0).normal(0.0, NOISE_FLOOR_RMS, x.size)
        pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


DNSMOS_KEYS = ("dnsmos", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808")


def speech_scores(wav, sr: int, text: str | None = None, asr=None) -> dict:
    """DNSMOS, and WER/CER against `text` when given; None with the reason for what cannot be scored.

    asr: anything with .transcribe(wav, sr) -> str (default: SphinxASR([text]), an LM from this text only)."""
    out = {k: None for k in (*DNSMOS_KEYS, "wer", "cer", "transcript")}
    reasons = {}
    wav = np.asarray(wav, dtype=np.float32).reshape(-1) if np.ndim(wav) <= 1 else np.asarray(wav)
    problem = clip_problem(wav, sr)
    if problem:
        reasons["dnsmos"] = reasons["wer"] = problem
        return {**out, "reasons": reasons}
    try:
        out.update(dnsmos(to_16k(wav, sr)))
    except ImportError:
        reasons["dnsmos"] = INSTALL_HINT
    if not text or not normalize_text(text):
        reasons["wer"] = "no reference text given"
    else:
        try:
            asr = asr or SphinxASR([text])
            out["transcript"] = asr.transcribe(wav, sr)
            out["wer"], out["cer"] = wer_cer(text, out["transcript"])
        except ImportError:
            reasons["wer"] = INSTALL_HINT
    return {**out, "reasons": reasons}


def load_scorer(spec: str):
    """A user's plug-in "module:function" (or "path/to/file.py:function"), called as
    function(wav: np.ndarray, sr: int, task: str, text: str) -> dict of extra scores (floats or None).
    It loads its own weights from local paths; HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE are set so a
    Hugging Face model that is not on disk fails instead of downloading."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"--audio-scorer {spec!r}: expected module:function or path/to/file.py:function")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FileNotFoundError(f"--audio-scorer: {where} does not exist")
        spec_ = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--audio-scorer {spec!r}: {where} has no function {name}")
    return fn
