"""DAC 16 kHz backends (dac_16khz, dac_16khz_random), the release-file reader, the model following the data's
codec, and prep -> mix -> tiny/paper_dac.yaml training -> generate on DAC tokens.

Run: .venv/bin/pytest tests/test_data_dac.py
The key map against the descript-audio-codec package's own module: scripts/check_dac_reference.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from data_prep import dac_codec
from data_prep.codec import load_codec, load_codec_from_info
from data_prep.codec_base import CodecUnavailable
from data_prep.dac_model import DAC_16KHZ
from data_prep.fixtures import SYNTHETIC_CODEC, write_corpus, write_synthetic_shards
from data_prep.mix import build_mix
from tests.codec_checks import low_precision_agreement
from training.config import BUILTIN_CORPORA, ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_DAC = os.path.join(REPO, "training", "configs", "tiny", "paper_dac.yaml")
# dac_16khz_random of seed 0, measured on x86 with AVX-512: the same bits on every machine and thread count
SEED0_FINGERPRINT = "a3d9f0335c260206"
BASELINE_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


@pytest.fixture(scope="module")
def other_process():
    """A second process, started first so it runs beside this one: the codec rebuilt from a recorded info
    with 2 threads and baseline x86 kernels (load_codec_from_info checks the recorded fingerprint)."""
    info = {"name": "dac_16khz_random", "seed": 0, "bandwidth": 6.0, "fingerprint": SEED0_FINGERPRINT}
    script = ("import json, sys, torch; torch.set_num_threads(2); "
              "from data_prep.codec import load_codec_from_info; "
              "print(load_codec_from_info(json.loads(sys.argv[1])).fingerprint())")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2", **BASELINE_CPU}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(info)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def codec(other_process):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_codec("dac_16khz_random", bandwidth=None, seed=0)
    finally:
        torch.set_num_threads(threads)


def _clip(seconds: float, sr: int = 16000) -> torch.Tensor:
    """[2, 1, S]: a gliding tone and a noisy chord, 16 kHz."""
    t = np.arange(int(seconds * sr)) / sr
    a = 0.3 * np.sin(2 * np.pi * (180 + 120 * t) * t)
    b = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (262, 330, 392))
    b = b + 0.02 * np.random.default_rng(0).standard_normal(len(t))
    return torch.from_numpy(np.stack([a, b])[:, None].astype(np.float32))


def test_encode_shape_rate_and_codebooks(codec):
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate) == (16000, 320, 50)
    assert (codec.num_codebooks, codec.codebook_size, codec.bandwidth) == (12, 1024, 6.0)
    wav = _clip(1.03)  # 16480 samples: not a whole number of hops
    codes = codec.encode(wav)
    assert codes.shape == (2, 12, codec.num_frames(16480)) == (2, 12, 52) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 1024
    # non-degenerate: every codebook spreads the frames over many codes, and no codebook repeats another
    assert all(codes[b, k].unique().numel() >= 10 for b in range(2) for k in range(12)), codes
    assert all(not torch.equal(codes[:, j], codes[:, k]) for j in range(12) for k in range(j))
    assert not torch.equal(codes[0], codes[1])  # the two clips get different codes


def test_decode_returns_the_inputs_length(codec):
    wav = _clip(0.5)  # 8000 samples = 25 hops
    codes = codec.encode(wav)
    out = codec.decode(codes)
    assert out.shape == (2, 1, codes.shape[-1] * 320) and torch.isfinite(out).all()
    assert abs(out.shape[-1] - wav.shape[-1]) < codec.hop_length
    assert out.abs().max() <= 1.0 and out.std() > 0  # tanh output, not silence


def test_encoder_under_autocast_keeps_most_codes(codec):
    """prep --device cuda runs the encoder in float16 (set_encode_dtype); the quantizer stays float32."""
    agree = low_precision_agreement(codec, _clip(0.5)[1:])  # the chord with noise, 25 frames
    assert agree[torch.float16] > 0.9 and agree[torch.bfloat16] > 0.7, agree


def test_info_and_labels(codec):
    info = json.loads(json.dumps(codec.info()))
    assert info["name"] == "dac_16khz_random" and info["trained"] is False and "UNTRAINED" in info["label"]
    assert (info["num_codebooks"], info["frame_rate"], info["hop_length"]) == (12, 50, 320)
    assert info["fingerprint"] == codec.fingerprint() and info["seed"] == 0 and info["random_init"] == 1
    with pytest.raises(ValueError, match="DAC 16 kHz: it has one, 6.0 kbps"):
        load_codec("dac_16khz_random", bandwidth=1.5)


def test_random_dac_is_bit_identical_across_threads_and_processes(codec, other_process):
    """Weights depend on the seed only: this process with 1 thread, the other one (rebuilt from the info
    record) with 2 threads and baseline kernels; the hard-coded value is the same codec on another CPU."""
    out, err = other_process.communicate(timeout=300)
    assert other_process.returncode == 0, err[-2000:]
    assert {out.split()[-1], codec.fingerprint()} == {SEED0_FINGERPRINT}
    other_seed = dac_codec._symmetric32(1, "encoder.block.0", 64, 0.1)
    assert not np.array_equal(other_seed, dac_codec._symmetric32(0, "encoder.block.0", 64, 0.1))


def _release_file(path: str, state: dict, kwargs: dict) -> str:
    """A file in the release's format (audiotools' BaseModel.save(package=False) of weights_16khz.pth)."""
    torch.save({"state_dict": state, "metadata": {"kwargs": kwargs}}, path)
    return path


def test_release_file_loads_by_its_keys_with_either_weight_norm_naming(codec, tmp_path):
    state = codec.model.state_dict()
    kwargs = {**DAC_16KHZ.kwargs(), "quantizer_dropout": 0.5}
    # torch's newer parametrized weight_norm names its tensors parametrizations.weight.original0/1
    renamed = {k.replace("weight_g", "parametrizations.weight.original0")
                .replace("weight_v", "parametrizations.weight.original1"): v for k, v in state.items()}
    path = _release_file(str(tmp_path / "weights_16khz.pth"), renamed, kwargs)
    loaded = load_codec("dac_16khz", checkpoint=path)
    assert loaded.trained and loaded.checkpoint == path and loaded.fingerprint() == codec.fingerprint()
    assert "label" not in loaded.info()
    wav = _clip(0.2)
    assert torch.equal(loaded.encode(wav), codec.encode(wav))


def test_bad_release_files_get_one_line_errors(codec, tmp_path):
    dac44 = {**DAC_16KHZ.kwargs(), "sample_rate": 44100, "encoder_rates": [2, 4, 8, 8], "n_codebooks": 9}
    foreign = {"x.weight": torch.zeros(1)}
    cases = {
        "44k.pth": (_release_file(str(tmp_path / "44k.pth"), {}, dac44),
                    "DAC 44100 Hz model .* not DAC 16 kHz"),
        "keys.pth": (_release_file(str(tmp_path / "keys.pth"), foreign, DAC_16KHZ.kwargs()),
                     "not a DAC 16 kHz state dict: 322 keys missing .* 1 unexpected .*x.weight"),
        "missing.pth": (str(tmp_path / "missing.pth"), "codec checkpoint not found"),
    }
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    cases["junk.pth"] = (str(tmp_path / "junk.pth"), "cannot load DAC checkpoint .*junk.pth")
    for path, pattern in cases.values():
        with pytest.raises(CodecUnavailable, match=pattern) as e:
            load_codec("dac_16khz", checkpoint=path)
        assert "\n" not in str(e.value)


def test_no_checkpoint_and_no_network_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(dac_codec, "package_cache_path", lambda: str(tmp_path / "cache" / "w.pth"))
    monkeypatch.setattr(dac_codec, "DAC_16KHZ_URL", "http://127.0.0.1:9/weights_16khz.pth")  # refused at once
    with pytest.raises(CodecUnavailable, match=r"cannot load DAC 16 kHz weights: no --codec-checkpoint .* "
                                               r"--codec-checkpoint PATH/weights_16khz.pth") as e:
        load_codec("dac_16khz")
    assert "\n" not in str(e.value)
    # data whose recorded weights file is gone: the release again (here: the same one-line error)
    gone = {"name": "dac_16khz", "bandwidth": 6.0, "checkpoint": str(tmp_path / "gone.pth"),
            "fingerprint": "0" * 16}
    with pytest.raises(CodecUnavailable, match="cannot load DAC 16 kHz weights"):
        load_codec_from_info(gone)


# ---- the model follows the data's codec


def _encodec_mix(tmp_path) -> str:
    """A mix whose codec record is EnCodec 24 kHz's (8 codebooks at 75 Hz), over synthetic shards."""
    prep_dir = str(tmp_path / "encodec_prep")
    write_synthetic_shards(prep_dir, items=8, shards=1)
    listing_path = os.path.join(prep_dir, "shards.json")
    with open(listing_path) as f:
        listing = json.load(f)
    listing["codec"] = {**SYNTHETIC_CODEC, "name": "encodec_24khz", "trained": True, "fingerprint": "e" * 16}
    with open(listing_path, "w") as f:
        json.dump(listing, f)
    out = str(tmp_path / "mix.json")
    build_mix([("speech", prep_dir), ("music", prep_dir)], out, ratio={"speech": 1, "music": 1})
    return out


def test_encodec_mix_given_to_the_12_codebook_config_names_both(tmp_path):
    mix = _encodec_mix(tmp_path)
    cfg = load_config(PAPER_DAC, [f"data.train={mix}"])
    with pytest.raises(ConfigError, match=r"model.num_codebooks=12 \(config 'tiny_paper_dac'\) but "
                                          r".*mix.json was prepared with the codec 'encodec_24khz': 8 "
                                          r"codebooks of 1024 codes at 75 Hz.*--codec dac_16khz"):
        cfg.validate(world_size=1)
    # without num_codebooks in the config the model follows the data: 8 codebooks with the paper's delays
    cfg = load_config(PAPER_DAC, [f"data.train={mix}", "model.num_codebooks=null"])
    cfg.validate(world_size=1)
    delays = cfg.model_config(num_codebooks=8, text_vocab_size=64).delays().delays
    assert delays == (0, 8, 9, 10, 11, 12, 13, 14)


def test_a_stage_refuses_runs_trained_on_another_codec_layout():
    from training.checkpoint.manifest import CheckpointError
    from training.checkpoint.weights import check_codebooks
    model_cfg = load_config(PAPER_DAC).model_config(text_vocab_size=64)  # 12 codebooks (DAC data)
    encodec_run = {"model_config": {"num_codebooks": 8, "codebook_size": 1024},
                   "codec_info": {"name": "encodec_24khz", "num_codebooks": 8}}
    pattern = (r"runs/speech was trained on codec 'encodec_24khz' \(8 codebooks of 1024 codes\) but this "
               r"stage's model has 12 codebooks of 1024")
    with pytest.raises(CheckpointError, match=pattern):
        check_codebooks(encodec_run, model_cfg, "runs/speech")
    check_codebooks({"model_config": {"num_codebooks": 12, "codebook_size": 1024}}, model_cfg, "runs/dac")


def test_paper_dac_config_is_the_papers_layout():
    cfg = load_config(PAPER_DAC)
    cfg.validate(world_size=1)
    mcfg = cfg.model_config(text_vocab_size=64)
    assert (mcfg.num_codebooks, mcfg.codebook_size) == (12, 1024)
    assert mcfg.delays().delays == (0, *range(8, 19)) and cfg.data.builtin == "fixtures_dac"
    from data_prep.demo import BUILTIN
    assert tuple(BUILTIN) == BUILTIN_CORPORA
    with pytest.raises(ConfigError, match="data.builtin must be one of demo, fixtures_dac"):
        load_config(PAPER_DAC, ["data.builtin=nope"])


# ---- end to end (about 30 s on 2 idle cores: the DAC's encoder and decoder on CPU, DeepSpeed start-up)


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_prep_mix_train_generate_on_dac_tokens(tmp_path):
    data = tmp_path / "data"
    manifest = write_corpus(str(data), speech=3, music=3, seconds=0.8, sr=22050)  # resampled to 16 kHz
    _run("data", "tokenizer", "--manifest", manifest, "--vocab-size", "48", "--out", str(data / "spm.model"))
    _run("data", "prep", "--manifest", manifest, "--out", str(data / "prep"), "--tokenizer",
         str(data / "spm.model"), "--codec", "dac_16khz_random", "--workers", "1")
    listing = json.loads((data / "prep" / "shards.json").read_text())
    assert listing["codec"]["name"] == "dac_16khz_random" and listing["codec"]["sample_rate"] == 16000
    mix = str(data / "mix.json")
    _run("data", "mix", "--source", f"speech={data / 'prep'}", "--source", f"music={data / 'prep'}",
         "--ratio", "speech=1,music=1", "--out", mix)
    run_dir = str(tmp_path / "run")
    _run("train", "--config", PAPER_DAC, "--out", run_dir, "--max-steps", "3", f"data.train={mix}")
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(np.isfinite(s["loss"]) for s in steps)
    wav_path = str(tmp_path / "music.wav")
    out = _run("generate", "--ckpt", run_dir, "--task", "music", "--text", "a calm melody", "--out", wav_path,
               "--min-seconds", "0.4", "--max-seconds", "0.6")
    audio, sr = sf.read(wav_path)
    assert sr == 16000 and 0 < len(audio) <= int(0.6 * 16000) + 320 and len(audio) % 320 == 0
    assert "untrained dac_16khz_random" in out.stdout + out.stderr
    roundtrip = _run("codec", "roundtrip", "--codec", "dac_16khz_random", wav_path, str(tmp_path / "rt.wav"),
                     "--json")
    result = json.loads(roundtrip.stdout.strip().splitlines()[-1])
    assert result["codec"]["fingerprint"] == listing["codec"]["fingerprint"]
    assert result["frames"] == len(audio) // 320 and sf.info(str(tmp_path / "rt.wav")).samplerate == 16000
