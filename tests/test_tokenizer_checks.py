"""Tokenizer identity across stage starts: specialists trained with different tokenizers (or text vocab
sizes) are refused before any process starts, exit 2 with both named; a stage whose data has another
tokenizer than its init checkpoint likewise; checkpoints from before the hash was recorded get a warning.

The specialists here are complete checkpoints of which only the meta is read (the check runs before any
weights are): COMPLETE + meta.json, as a save writes them.

Run: .venv/bin/pytest tests/test_tokenizer_checks.py
"""

import json
import os

import pytest

from training.checkpoint.manifest import tag_name, write_complete
from training.checkpoint.tokenizers import check_init_sources
from training.cli import main
from training.config import ConfigError

STAGE2 = "training/configs/tiny/stage2.yaml"


def _specialist(root, name, sha, vocab=64):
    tag = root / name / "checkpoints" / tag_name(6)
    tag.mkdir(parents=True)
    meta = {"step": 6, "stage": 1, "tokenizer_path": f"/data/{name}/spm.model",
            "model_config": {"text_vocab_size": vocab}}
    if sha is not None:
        meta["tokenizer_sha256"] = sha
    (tag / "meta.json").write_text(json.dumps(meta))
    write_complete(str(tag), 6)
    return str(root / name)


def _mix(path, sha):
    path.write_text(json.dumps({"tokenizer": "spm.model", "tokenizer_sha256": sha}))
    return str(path)


def test_specialists_with_different_tokenizers_exit_2_naming_both(tmp_path, capsys):
    a = _specialist(tmp_path, "speech", "a" * 64)
    b = _specialist(tmp_path, "music", "b" * 64)
    code = main(["train", "--config", STAGE2, "--nproc", "2", "--out", str(tmp_path / "run"),
                 f"stage.init_from=[{a},{b}]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "different tokenizers" in err and a in err and b in err
    assert "aaaaaaaaaaaa" in err and "bbbbbbbbbbbb" in err
    assert not os.path.exists(tmp_path / "run")  # refused before any rank started


def test_specialists_with_different_vocab_sizes_are_refused_without_hashes(tmp_path):
    a = _specialist(tmp_path, "speech", None, vocab=64)
    b = _specialist(tmp_path, "music", None, vocab=448)
    with pytest.raises(ConfigError, match="448 pieces"):
        check_init_sources([a, b], None)


def test_checkpoints_before_the_hash_warn_and_pass(tmp_path):
    a = _specialist(tmp_path, "speech", None)
    b = _specialist(tmp_path, "music", "b" * 64)
    said = []
    check_init_sources([a, b], None, log=said.append)
    assert len(said) == 1 and "warning" in said[0] and a in said[0] and b not in said[0]


def test_init_checkpoint_and_stage_data_must_share_the_tokenizer(tmp_path):
    a = _specialist(tmp_path, "stage2", "a" * 64)
    with pytest.raises(ConfigError, match="another tokenizer than the stage's data"):
        check_init_sources([a], _mix(tmp_path / "mix.json", "c" * 64))
    said = []
    check_init_sources([a], _mix(tmp_path / "same.json", "a" * 64), log=said.append)
    assert said == []


def test_small_local_codec_weights_travel_in_the_bundle(tmp_path):
    """The codec contract: a local codec checkpoint of <= 64 MiB is copied into DIR/codec/ and resolved
    against wherever the bundle is opened; model.json holds no absolute path to it or the tokenizer."""
    from training.checkpoint.bundle import resolve_bundle, write_bundle_files

    tok = tmp_path / "spm.model"
    tok.write_bytes(b"not really sentencepiece")
    weights = tmp_path / "demo_codec.safetensors"
    weights.write_bytes(b"\0" * 1000)
    meta = {"tokenizer_path": str(tok), "codec_info": {"name": "demo", "sample_rate": 24000,
                                                        "fingerprint": "f00d", "checkpoint": str(weights)}}
    out = tmp_path / "bundle"
    out.mkdir()
    written = write_bundle_files(str(out), meta, "run", log=lambda m: None)
    assert (out / "codec" / "demo_codec.safetensors").read_bytes() == weights.read_bytes()
    assert str(tmp_path) not in json.dumps(written)
    moved = tmp_path / "moved"
    out.rename(moved)
    resolved = resolve_bundle(written, str(moved))
    assert resolved["codec_info"]["checkpoint"] == str(moved / "codec" / "demo_codec.safetensors")
    assert resolved["tokenizer_path"] == str(moved / "tokenizer.model")
    assert json.loads((moved / "codec.json").read_text())["name"] == "demo"


def test_exported_bundles_as_specialists_are_checked_too(tmp_path, capsys):
    """stage.init_from may name exported bundle directories: they are accepted as sources and checked."""
    dirs = []
    for name, sha in (("speech", "a" * 64), ("music", "d" * 64)):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"")  # only the meta is read before the refusal
        meta = {"tokenizer_path": "tokenizer.model", "tokenizer_sha256": sha, "codec_info": {},
                "bundle": {"tokenizer": "tokenizer.model"}, "model_config": {"text_vocab_size": 64}}
        (d / "model.json").write_text(json.dumps(meta))
        dirs.append(str(d))
    code = main(["train", "--config", STAGE2, "--nproc", "2", "--out", str(tmp_path / "run"),
                 f"stage.init_from=[{dirs[0]},{dirs[1]}]"])
    err = capsys.readouterr().err
    assert code == 2 and "different tokenizers" in err and "dddddddddddd" in err
    assert str(tmp_path / "speech" / "tokenizer.model") in err  # the bundle's path, resolved
