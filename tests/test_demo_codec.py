"""The demo codec (`--codec demo`): deterministic fit, the codec interface, its file, reconstruction quality.

Run: .venv/bin/pytest tests/test_demo_codec.py
The fit tests use data_prep/fixtures clips and small codebooks (seconds); the quality tests use the real
demo codec, fitted once per machine on the demo corpus's train split (the same fit the demo corpus needs).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from data_prep.codec import CodecUnavailable, load_codec, load_codec_from_info
from data_prep.demo_codec import DemoCodecConfig, save_demo_codec
from data_prep.demo_codec_fit import FitConfig, fit_demo_codec
from training.eval.spectral import spectral_scores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = DemoCodecConfig(dims=16, levels=3, entries=32, griffin_lim_iters=8)
SMALL_FIT = FitConfig(max_frames=1500, iterations=4)
HELD_OUT = "Seven quiet engineers measured the bright window before lunch."

FIT_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from data_prep.demo_codec import save_demo_codec
from tests.test_demo_codec import fit_small
codec = fit_small(sys.argv[1])
save_demo_codec(codec, sys.argv[3])
print(codec.fingerprint(), hashlib.sha256(open(sys.argv[3], "rb").read()).hexdigest())
"""


def fixture_clips(root: str) -> list[np.ndarray]:
    """data_prep/fixtures clips (voice-like tones, rendered music) at 24 kHz."""
    from data_prep.fixtures import write_corpus

    write_corpus(root, speech=3, music=3, seconds=1.0, sr=24000, seed=3)
    return [sf.read(os.path.join(root, "wavs", f), dtype="float32")[0]
            for f in sorted(os.listdir(os.path.join(root, "wavs")))]


def fit_small(root: str):
    return fit_demo_codec(fixture_clips(root), SMALL, SMALL_FIT)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return fit_small(str(tmp_path_factory.mktemp("clips")))


def test_fit_is_bit_identical_across_threads_and_processes(small, tmp_path):
    outs = []
    for i, threads in enumerate((1, 2)):
        path = tmp_path / f"codec{i}.safetensors"
        args = [str(tmp_path / f"clips{i}"), str(threads), str(path)]
        run = subprocess.run([sys.executable, "-c", FIT_SCRIPT, *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(run.stdout.split())
    mine = tmp_path / "mine.safetensors"
    save_demo_codec(small, str(mine))
    here = [small.fingerprint(), hashlib.sha256(mine.read_bytes()).hexdigest()]
    assert outs[0] == outs[1] == here  # the fingerprint and every byte of the file


def test_interface_shapes_and_frame_count(small):
    assert (small.sample_rate, small.hop_length, small.frame_rate) == (24000, 320, 75)
    assert (small.num_codebooks, small.codebook_size, small.trained) == (3, 32, True)
    gen = torch.Generator().manual_seed(0)
    for samples in (320 * 50, 320 * 50 + 1, 24100, 700):  # a multiple of the hop gives exactly S / 320 frames
        codes = small.encode(0.1 * torch.randn(2, 1, samples, generator=gen))
        assert codes.shape == (2, 3, small.num_frames(samples)) and codes.dtype == torch.long
        assert small.num_frames(samples) == -(-samples // 320)
        assert codes.min() >= 0 and codes.max() < 32
        wav = small.decode(codes)
        assert wav.shape == (2, 1, codes.shape[-1] * 320) and torch.isfinite(wav).all()
    assert small.encode(torch.zeros(1, 1, 0)).shape == (1, 3, 0)
    with pytest.raises(ValueError, match="expects wav"):
        small.encode(torch.zeros(100))
    with pytest.raises(ValueError, match="must lie in"):
        small.decode(torch.full((1, 3, 4), 32))


def test_file_loads_exactly_and_is_recorded(small, tmp_path):
    path = str(tmp_path / "codec.safetensors")
    save_demo_codec(small, path)
    loaded = load_codec("demo", checkpoint=path, bandwidth=None)
    info = loaded.info()
    assert info["checkpoint"] == os.path.abspath(path) and info["name"] == "demo"
    assert loaded.fingerprint() == small.fingerprint() == info["fingerprint"]
    assert info["fit"]["frames_used"] == small.fit["frames_used"]
    assert info["bandwidth"] == round(3 * 5 * 75 / 1000, 3)  # 3 codebooks of 32 codes (5 bits) at 75 Hz
    wav = 0.1 * torch.randn(1, 1, 4800, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.encode(wav), small.encode(wav))
    again = load_codec_from_info(json.loads(json.dumps(info)))  # as recorded in shards.json
    assert again.fingerprint() == small.fingerprint()
    with pytest.raises(CodecUnavailable, match="fingerprint"):
        load_codec_from_info({**info, "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="bandwidth"):
        load_codec("demo", checkpoint=path, bandwidth=6.0)
    with pytest.raises(CodecUnavailable, match="not found"):
        load_codec("demo", checkpoint=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CodecUnavailable, match="not a readable safetensors"):
        load_codec("demo", checkpoint=str(bad))
    with pytest.raises(CodecUnavailable, match="does not have"):
        load_codec_from_info({**info, "name": "dac_99khz"})


def test_small_fit_reconstructs_held_out_clip(small, tmp_path):
    """A fixture-sized fit (6 clips of 1 s, 3 x 32 codes) reconstructs a held-out voice-like fixture clip
    (tone + noise, another seed): measured SC 0.23. (Its 3 music clips are too few for held-out music.)"""
    from data_prep.fixtures import write_corpus

    write_corpus(str(tmp_path), speech=1, music=0, seconds=1.0, sr=24000, seed=11)
    ref = sf.read(tmp_path / "wavs" / "speech_0000.wav", dtype="float32")[0]
    out = small.decode(small.encode(torch.from_numpy(ref)[None, None]))[0, 0, : len(ref)].numpy()
    assert spectral_scores(ref, out, 24000)["sc"] <= 0.4


def test_prep_cli_with_codec_demo_records_it(small, tmp_path):
    from data_prep.fixtures import corpus_with_tokenizer
    from training.cli import main as cli

    manifest, tok = corpus_with_tokenizer(str(tmp_path / "corpus"), speech=2, music=2)
    path = str(tmp_path / "codec.safetensors")
    save_demo_codec(small, path)
    out = tmp_path / "prep"
    args = ["--codec", "demo", "--codec-checkpoint", path, "--bandwidth", str(small.bandwidth), "--workers=0"]
    assert cli(["data", "prep", "--manifest", manifest, "--out", str(out), "--tokenizer", tok, *args]) == 0
    info = json.loads((out / "shards.json").read_text())["codec"]
    assert (info["name"], info["checkpoint"], info["fingerprint"]) == ("demo", path, small.fingerprint())
    assert load_codec_from_info(info).fingerprint() == small.fingerprint()


# ---- the real demo codec (fitted once per machine on the demo corpus's train split) ----

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def held_out_speech(path) -> np.ndarray:
    from data_prep.audio import resample
    from data_prep.synth import speak

    speak(HELD_OUT, str(path), "en-us", 170, 50)
    wav, sr = sf.read(path, dtype="float32")
    return resample(wav, sr, 24000)


@needs_espeak
def test_demo_codec_reconstructs_held_out_speech(tmp_path):
    ref = held_out_speech(tmp_path / "held.wav")
    scores = {}
    for name in ("demo", "random"):
        codec = load_codec(name)
        out = codec.decode(codec.encode(torch.from_numpy(ref)[None, None]))[0, 0, : len(ref)].numpy()
        scores[name] = spectral_scores(ref, out, 24000)
    assert scores["demo"]["sc"] <= 0.4 and scores["random"]["sc"] > 1.0, scores
    assert scores["demo"]["lsd_db"] < scores["random"]["lsd_db"]


def test_a_record_whose_file_is_gone_refits_the_default_and_checks_it(small, tmp_path):
    default = load_codec("demo")  # the cached fit (fitted once per machine if absent)
    moved = {**default.info(), "checkpoint": str(tmp_path / "gone" / "demo_codec.safetensors")}
    assert load_codec_from_info(moved).fingerprint() == default.fingerprint()  # deterministic: same codec
    other = {**small.info(), "checkpoint": str(tmp_path / "gone.safetensors")}
    with pytest.raises(CodecUnavailable, match="is gone"):  # not the default: refused, not mis-decoded
        load_codec_from_info(other)


@needs_espeak
def test_codec_roundtrip_cli_json(tmp_path):
    held_out_speech(tmp_path / "speech.wav")
    sf.write(tmp_path / "silence.wav", np.zeros(24000, np.float32), 24000)
    results = {}
    for name in ("speech", "silence"):
        run = subprocess.run([sys.executable, "-m", "training.cli", "codec", "roundtrip", "--codec", "demo",
                              str(tmp_path / f"{name}.wav"), str(tmp_path / f"{name}_out.wav"), "--json",
                              "--text", HELD_OUT.lower()],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300,  # any directory
                             env=dict(os.environ, PYTHONPATH=REPO))
        assert run.returncode == 0, run.stderr[-2000:]
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        assert sf.info(str(tmp_path / f"{name}_out.wav")).samplerate == 24000
    speech, silence = results["speech"], results["silence"]
    assert 0 < speech["sc"] <= 0.4 and 0 < speech["lsd_db"] < 10 and speech["reason"] is None
    assert speech["codec"]["name"] == "demo" and speech["frames"] >= speech["seconds"] * 75
    assert silence["sc"] is None and silence["lsd_db"] is None and "silent" in silence["reason"]
