"""Speech scores (DNSMOS, WER/CER by pocketsphinx) and the music caption-adherence score.

    .venv/bin/pytest tests/test_audio_metrics.py
DNSMOS's first call compiles librosa's numba functions (~20 s once per machine, NUMBA_CACHE_DIR keeps them).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("speechmos", reason="the metrics extra is not installed (pip install '.[metrics]')")
pytest.importorskip("pocketsphinx", reason="the metrics extra is not installed")

from data_prep.music import random_piece, render  # noqa: E402
from training.eval import audio_metrics  # noqa: E402
from training.eval.audio_metrics import SphinxASR, load_scorer, speech_scores  # noqa: E402
from training.eval.music_score import caption_attributes, music_scores  # noqa: E402

SENTENCE = "The old sailor repaired the broken clock near the harbour."


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from data_prep.synth import speak

    path = str(tmp_path_factory.mktemp("speech") / "s.wav")
    speak(SENTENCE, path, "en-us", 150, 50)
    wav, sr = sf.read(path, dtype="float32")
    return wav, sr


def _bad_clips(sr):
    rng = np.random.default_rng(0)
    loud = rng.uniform(-1, 1, 2 * sr).astype(np.float32)
    loud[::4] = 1.0  # 25% of the samples at full scale
    nan = rng.normal(0, 0.1, 2 * sr).astype(np.float32)
    nan[100] = np.nan
    short = rng.normal(0, 0.1, sr // 10).astype(np.float32)
    return {"silent": np.zeros(2 * sr, np.float32), "too short": short, "clipped": loud, "non-finite": nan}


def test_espeak_sentence_scores_high_and_noise_scores_at_the_floor(speech):
    wav, sr = speech
    good = speech_scores(wav, sr, SENTENCE)
    assert good["reasons"] == {}
    assert good["wer"] <= 0.2 and good["cer"] <= 0.1, good["transcript"]
    assert good["dnsmos"] > 2.3
    noise = np.random.default_rng(1).normal(0, 0.1, wav.size).astype(np.float32)
    bad = speech_scores(noise, sr, SENTENCE)
    assert bad["dnsmos"] < 1.6  # white noise: DNSMOS' floor, ~1.1
    assert bad["wer"] >= 0.8
    no_text = speech_scores(wav, sr)
    assert no_text["dnsmos"] == good["dnsmos"] and no_text["wer"] is None
    assert "no reference text" in no_text["reasons"]["wer"]


def test_asr_language_model_from_several_texts_is_deterministic(speech):
    wav, sr = speech
    asr = SphinxASR([SENTENCE, "A curious cat found the red lantern.", "Where is the blue kite?"])
    first = asr.transcribe(wav, sr)
    assert first == asr.transcribe(wav, sr)
    assert audio_metrics.wer_cer(SENTENCE, first)[0] <= 0.2


@pytest.mark.parametrize("kind", ["silent", "too short", "clipped", "non-finite"])
def test_bad_clip_gets_nulls_with_the_reason(kind):
    sr = 16000
    wav = _bad_clips(sr)[kind]
    s = speech_scores(wav, sr, SENTENCE)
    assert all(s[k] is None for k in ("dnsmos", "dnsmos_sig", "wer", "cer", "transcript"))
    assert kind in s["reasons"]["dnsmos"] and kind in s["reasons"]["wer"]
    m = music_scores(wav, sr, "a calm piano melody in A minor, 70 bpm")
    assert m["music_score"] is None and kind in m["reason"]


def test_missing_extra_gives_nulls_with_the_install_hint(speech, monkeypatch):
    wav, sr = speech
    for name in ("speechmos", "speechmos.dnsmos", "pocketsphinx"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    s = speech_scores(wav, sr, SENTENCE)
    assert s["dnsmos"] is None and s["wer"] is None
    assert "pip install" in s["reasons"]["dnsmos"] and "pip install" in s["reasons"]["wer"]


def test_captions_parse_to_the_rendered_parameters():
    rng = np.random.default_rng(3)
    for _ in range(30):
        p = random_piece(rng)
        stated = caption_attributes(p.caption(rng))
        assert stated["instrument"] == p.instrument and stated["drums"] == p.drums
        assert (stated["key"], stated["mode"]) == (p.key, p.mode)
        assert stated.get("tempo", p.tempo) == p.tempo and stated.get("pace", p.pace) == p.pace


def test_music_score_references_beat_mismatched_captions():
    rng = np.random.default_rng(7)
    items = []
    for _ in range(12):
        p = random_piece(rng, 2.5, 4.0)
        items.append((p.caption(rng), render(p, rng, 24000)))
    own = [music_scores(y, 24000, c)["music_score"] for c, y in items]
    other = [music_scores(y, 24000, items[(i + 1) % 12][0])["music_score"] for i, (_, y) in enumerate(items)]
    assert np.mean(own) >= 0.6 and np.mean(own) >= np.mean(other) + 0.25, (own, other)


def test_plugin_scorer_from_a_local_file(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # restored after the test
    plugin = tmp_path / "my_scorer.py"
    plugin.write_text("import numpy as np\n"
                      "def score(wav, sr, task, text):\n"
                      "    return {'rms': float(np.sqrt(np.mean(wav ** 2))), 'task_len': len(task)}\n")
    fn = load_scorer(f"{plugin}:score")
    assert fn(np.full(10, 0.5), 16000, "music", "x") == {"rms": 0.5, "task_len": 5}
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ValueError, match="no function"):
        load_scorer(f"{plugin}:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scorer(f"{tmp_path}/missing.py:score")
    with pytest.raises(FileNotFoundError, match="ASR model folder"):
        SphinxASR(["hello"], model_dir=str(tmp_path / "no_model"))
