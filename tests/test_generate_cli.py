"""`unimoe generate` from a tiny trained checkpoint: valid WAVs within the length bounds for both tasks,
the same seed gives the same audio, run dir and exported model.safetensors agree, clear errors for bad
checkpoints, a pickle file is refused unread; `unimoe eval` on the same checkpoint; generation in new
processes with other thread counts than prep's; the `--max-steps` cap line of the training command.

    .venv/bin/pytest tests/test_generate_cli.py      (trains a tiny MoE model for 2 steps first, ~40 s)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.crafted import RunsCode
from training.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_S, MAX_S = 0.2, 0.6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny joint MoE model (EP=2, ZeRO 2, 2 gloo processes) trained for 2 steps on the demo corpus
    (config max_steps=2; the larger --max-steps 5 is capped) -> (run dir, the command's stdout)."""
    run = tmp_path_factory.mktemp("generate") / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "training.cli", "train", "--config", "training/configs/tiny/joint.yaml",
           "--nproc", "2", "--max-steps", "5", "--out", str(run), "max_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(run), proc.stdout


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


def _generate(ckpt, task, text, out, seed, num=2, extra=()):
    return main(["generate", "--ckpt", ckpt, "--task", task, "--text", text, "--out", out, "--num", str(num),
                 "--seed", str(seed), "--min-seconds", str(MIN_S), "--max-seconds", str(MAX_S), *extra])


def _read(path):
    audio, sr = sf.read(path, dtype="float32")
    assert audio.ndim == 1 and np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    return audio, sr


@pytest.mark.parametrize("task,text", [("speech", "hello there, this is a test"),
                                       ("music", "a calm piano melody in A minor")])
def test_wavs_within_bounds_and_seed_reproducible(run_dir, tmp_path, task, text):
    first, again, other = (str(tmp_path / f"{name}.wav") for name in ("a", "b", "c"))
    assert _generate(run_dir, task, text, first, seed=3) == 0
    assert _generate(run_dir, task, text, again, seed=3) == 0
    assert _generate(run_dir, task, text, other, seed=4) == 0
    for i in range(2):
        a, sr = _read(first.replace(".wav", f"_{i}.wav"))
        b, _ = _read(again.replace(".wav", f"_{i}.wav"))
        assert sr == 24000
        assert MIN_S - 1e-6 <= len(a) / sr <= MAX_S + 1e-6, len(a) / sr
        np.testing.assert_array_equal(a, b)  # same seed, same audio
    c, _ = _read(other.replace(".wav", "_0.wav"))
    a, _ = _read(first.replace(".wav", "_0.wav"))
    assert len(a) != len(c) or not np.array_equal(a, c)  # another seed, other audio


def test_max_steps_above_the_config_is_capped_with_one_line(trained):
    run, stdout = trained
    assert stdout.count("--max-steps 5 is capped at the config's max_steps=2") == 1, stdout[-3000:]
    assert "to train longer, override max_steps=5" in stdout
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f if line.strip()] == [1, 2]


def test_generate_in_new_processes_with_other_thread_counts_writes_wavs(run_dir, tmp_path):
    """The codec is rebuilt in a new process: with 1 and with 2 threads, so at least one differs from the
    thread count the demo corpus was prepared with; the fingerprint check passes and the WAV is written."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    outs = {n: str(tmp_path / f"threads{n}.wav") for n in (1, 2)}
    cmd = [sys.executable, "-m", "training.cli", "generate", "--ckpt", run_dir, "--task", "music", "--text",
           "a calm piano melody", "--max-seconds", "0.3", "--out"]
    procs = {n: subprocess.Popen(cmd + [out], cwd=REPO, env={**env, "OMP_NUM_THREADS": str(n)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, out in outs.items()}
    for n, p in procs.items():
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"OMP_NUM_THREADS={n}: {log[-3000:]}"
        audio, sr = _read(outs[n])
        assert sr == 24000 and len(audio) > 0


def test_exported_model_gives_the_same_audio(run_dir, tmp_path):
    exported = str(tmp_path / "model.safetensors")
    assert main(["ckpt", "export", "--ckpt", run_dir, "--out", exported]) == 0
    from_run, from_export = str(tmp_path / "run.wav"), str(tmp_path / "export.wav")
    assert _generate(run_dir, "music", "slow strings", from_run, seed=7, num=1) == 0
    assert _generate(exported, "music", "slow strings", from_export, seed=7, num=1) == 0
    np.testing.assert_array_equal(_read(from_run)[0], _read(from_export)[0])


def test_a_pickle_model_is_refused_unread(tmp_path, capsys):
    """A crafted model.pt whose unpickling would run code: generate refuses it and the code does not run."""
    marker = str(tmp_path / "code_ran")
    crafted = str(tmp_path / "model.pt")
    torch.save({"model": {}, "meta": RunsCode(marker)}, crafted)
    assert _generate(crafted, "speech", "hi", str(tmp_path / "x.wav"), seed=0, num=1) == 2
    err = capsys.readouterr().err
    assert f"{crafted}: not read" in err and "safetensors" in err
    assert not os.path.exists(marker)


def test_clear_errors_for_missing_incomplete_and_incompatible(run_dir, tmp_path, capsys):
    out = str(tmp_path / "x.wav")
    assert _generate(str(tmp_path / "nope"), "speech", "hi", out, seed=0, num=1) == 2
    assert "does not exist" in capsys.readouterr().err

    incomplete = tmp_path / "incomplete"
    shutil.copytree(run_dir, incomplete)
    for root, _, files in os.walk(incomplete):
        if "COMPLETE" in files:
            os.remove(os.path.join(root, "COMPLETE"))
    assert _generate(str(incomplete), "speech", "hi", out, seed=0, num=1) == 2
    assert "no complete checkpoint" in capsys.readouterr().err

    exported = str(tmp_path / "model.safetensors")
    assert main(["ckpt", "export", "--ckpt", run_dir, "--out", exported]) == 0
    meta_path = str(tmp_path / "model.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["num_layers"] += 1  # a config the weights do not match
    json.dump(meta, open(meta_path, "w"))
    capsys.readouterr()
    assert _generate(exported, "speech", "hi", out, seed=0, num=1) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "layers.2." in err
    assert not os.path.exists(out)


def test_eval_cli_on_the_trained_checkpoint(run_dir, tmp_path, capsys):
    """`unimoe eval` on the same tiny checkpoint (shares the trained run with the generation tests)."""
    from data_prep.demo import ensure_demo_data

    valid = ensure_demo_data()["valid"]
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", run_dir, "--data", valid, "--out", str(out), "--batches", "2",
                 "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "validation loss (8 samples)" in printed and "routing: experts/token" in printed
    for name in ("eval.json", "routing.json", "routing_load.png", "routing_capacity.png"):
        assert (out / name).stat().st_size > 0
    assert main(["eval", "--ckpt", run_dir, "--data", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "no_run"), "--data", valid]) == 2
    assert "no_run does not exist" in capsys.readouterr().err


def _run_with_own_tokenizer(run_dir, tmp_path):
    """A copy of the run whose meta points at a tokenizer copy of its own (deleted by the tests)."""
    from training.checkpoint.manifest import find_checkpoint, read_meta, tag_step, write_complete

    run = tmp_path / "run_copy"
    shutil.copytree(run_dir, run)
    tag = find_checkpoint(str(run))
    meta = read_meta(tag)
    tok = tmp_path / "tok" / "spm.model"
    tok.parent.mkdir()
    shutil.copyfile(meta["tokenizer_path"], tok)
    meta["tokenizer_path"] = str(tok)
    with open(os.path.join(tag, "meta.json"), "w") as f:
        json.dump(meta, f)
    write_complete(tag, tag_step(tag))
    return str(run), tok


def test_checkpoint_meta_records_the_tokenizer_sha256(run_dir):
    from data_prep.shards import sha256_file
    from training.checkpoint.manifest import find_checkpoint, read_meta

    meta = read_meta(find_checkpoint(run_dir))
    assert meta["tokenizer_sha256"] == sha256_file(meta["tokenizer_path"])


def test_exported_bundle_travels_without_its_tokenizer(run_dir, tmp_path, capsys):
    """Export to a directory, delete the tokenizer the run was trained with, move the directory: generate
    gives the same audio as the run. The older single-file export of the same run cannot find its tokenizer
    then, and does with --tokenizer (the bundle's copy); another tokenizer is refused by its sha256."""
    run, tok = _run_with_own_tokenizer(run_dir, tmp_path)
    bundle, legacy = tmp_path / "bundle", str(tmp_path / "legacy" / "model.safetensors")
    assert main(["ckpt", "export", "--ckpt", run, "--out", str(bundle)]) == 0
    assert main(["ckpt", "export", "--ckpt", run, "--out", legacy]) == 0
    names = {p.name for p in bundle.iterdir()}
    assert {"model.safetensors", "model.json", "tokenizer.model", "codec.json"} <= names
    codec = json.loads((bundle / "codec.json").read_text())
    assert codec["name"] == "demo" and codec["sample_rate"] == 24000 and codec["fingerprint"]  # the demo's
    carried = list((bundle / "codec").iterdir())  # the fitted demo codec travels with the bundle (a few MB)
    assert len(carried) == 1 and carried[0].stat().st_size < 16 * 2**20
    from data_prep.codec import load_codec

    assert load_codec("demo", checkpoint=str(carried[0])).fingerprint() == codec["fingerprint"]
    from_run = str(tmp_path / "run.wav")
    assert _generate(run, "music", "slow strings", from_run, seed=7, num=1) == 0
    tok.unlink()
    moved = tmp_path / "elsewhere" / "my_model"
    shutil.move(str(bundle), moved)
    from_bundle = str(tmp_path / "bundle.wav")
    assert _generate(str(moved), "music", "slow strings", from_bundle, seed=7, num=1) == 0
    np.testing.assert_array_equal(_read(from_run)[0], _read(from_bundle)[0])
    from data_prep.demo import ensure_demo_data

    assert main(["eval", "--ckpt", str(moved), "--data", ensure_demo_data()["valid"], "--out",
                 str(tmp_path / "eval"), "--batches", "1", "--batch-size", "2"]) == 0
    capsys.readouterr()
    assert _generate(legacy, "music", "slow strings", str(tmp_path / "x.wav"), seed=7, num=1) == 2
    assert "is missing" in capsys.readouterr().err
    own = str(moved / "tokenizer.model")
    assert _generate(legacy, "music", "slow strings", str(tmp_path / "y.wav"), seed=7, num=1,
                     extra=["--tokenizer", own]) == 0
    from data_prep.text import train_tokenizer

    foreign = str(tmp_path / "foreign.model")
    train_tokenizer(["a completely different corpus of text", "with other words in it"] * 20, foreign,
                    vocab_size=40, log=lambda m: None)
    capsys.readouterr()
    assert _generate(str(moved), "music", "x", str(tmp_path / "z.wav"), seed=7, num=1,
                     extra=["--tokenizer", foreign]) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and foreign in err


def test_eval_refuses_data_of_another_tokenizer(run_dir, tmp_path, capsys):
    from data_prep.codec import load_codec
    from data_prep.fixtures import corpus_with_tokenizer
    from data_prep.mix import build_mix
    from data_prep.prep import PrepConfig, prep

    manifest, tok = corpus_with_tokenizer(str(tmp_path), speech=2, music=2, seconds=0.3, valid=1)
    out = str(tmp_path / "prep")
    prep(PrepConfig(manifest=manifest, out=out, tokenizer=tok, codec="random", workers=0, progress=False),
         codec=load_codec("random"), log=lambda m: None)
    mix = str(tmp_path / "valid.json")
    build_mix([("speech", out), ("music", out)], mix, ratio={"speech": 1, "music": 1}, split="valid")
    assert main(["eval", "--ckpt", run_dir, "--data", mix, "--out", str(tmp_path / "eval"),
                 "--batches", "1", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and mix in err and run_dir in err


def test_eval_audio_metrics_writes_per_task_scores_for_generations_and_references(run_dir, tmp_path, capsys):
    """`unimoe eval --audio-metrics`: per task, scores of the generations and of the codec's reconstruction
    of the references, per-item scores and the WAVs they came from."""
    pytest.importorskip("speechmos", reason="the metrics extra is not installed (pip install '.[metrics]')")
    from data_prep.demo import ensure_demo_data

    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", run_dir, "--data", ensure_demo_data()["valid"], "--out", str(out),
                 "--batches", "1", "--batch-size", "2", "--audio-metrics", "--audio-items", "2"]) == 0
    printed = capsys.readouterr().out
    assert "audio (generated): speech DNSMOS" in printed and "audio (reference): speech DNSMOS" in printed
    summary = json.loads((out / "eval.json").read_text())["audio_metrics"]
    detail = json.loads((out / "audio_metrics.json").read_text())
    for kind in ("generated", "reference"):
        speech, music = summary[kind]["speech"], summary[kind]["music"]
        assert speech["clips"] == music["clips"] == 2
        for m, key in ((speech, "dnsmos"), (speech, "wer"), (music, "music_score")):
            nulls = sum(m.get(f"{key}_null", {}).values())
            assert m[f"{key}_scored"] + nulls == 2  # every clip: a score or a reason
            assert (m[key] is None) == (m[f"{key}_scored"] == 0)
        items = detail["items"][kind]
        assert sorted(it["task"] for it in items) == ["music", "music", "speech", "speech"]
        for it in items:
            assert (out / "audio" / kind / f"{it['id']}.wav").stat().st_size > 0
            if it["task"] == "speech" and it["wer"] is not None:
                assert it["wer"] >= 0 and isinstance(it["transcript"], str) and it["text"]
        scored = [it["dnsmos"] for it in items if it["task"] == "speech" and it["dnsmos"] is not None]
        if scored:
            assert speech["dnsmos"] == pytest.approx(sum(scored) / len(scored))
    assert "music_score_floor" in summary["reference"]["music"]
