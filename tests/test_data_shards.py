"""Shards: re-runs skip complete shards, a crash mid-shard lists nothing partial, slices merge.

Run: .venv/bin/pytest tests/test_data_shards.py
"""

import json
import os

import pytest

from data_prep import shards as sh
from data_prep.codec import load_codec
from data_prep.fixtures import write_corpus
from data_prep.prep import CRASH_ENV, PrepConfig, prep
from data_prep.text import train_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = write_corpus(str(root), speech=4, music=4, seconds=0.5)
    with open(manifest) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = str(root / "spm.model")
    train_tokenizer(texts, tok, vocab_size=64, log=lambda m: None)
    codec = load_codec("random", seed=0)
    clean = str(root / "clean")
    prep(_cfg(manifest, clean, tok), codec=codec, log=lambda m: None)
    return manifest, tok, codec, clean


def _cfg(manifest, out, tok, **kw):
    return PrepConfig(
        manifest=manifest,
        out=out,
        tokenizer=tok,
        codec="random",
        workers=0,
        shard_size=3,
        progress=False,
        **kw,
    )


def _files(out):
    listing = sh.load_list(os.path.join(out, sh.LIST_NAME))
    return {e["name"]: e["files"] for e in listing["shards"]}


def test_clean_run_lists_shards_with_checksums(setup):
    _, _, _, clean = setup
    listing = sh.load_list(os.path.join(clean, sh.LIST_NAME))
    assert [e["items"] for e in listing["shards"]] == [3, 3, 2]
    for e in listing["shards"]:
        assert sh.verify_entry(clean, e) is None
        assert e["seconds"] == pytest.approx(0.5 * e["items"], abs=0.01)
        assert e["tokens"] == e["items"] * 8 * 38  # ceil(0.5 * 75) frames x 8 codebooks
    assert listing["codec"]["trained"] is False and "UNTRAINED" in listing["codec"]["label"]
    assert sh.main(["verify", clean]) == 0


def test_rerun_skips_complete_shards_and_rebuilds_damaged(setup, tmp_path):
    manifest, tok, codec, clean = setup
    out = str(tmp_path / "out")
    prep(_cfg(manifest, out, tok), codec=codec, log=lambda m: None)
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for fs in _files(out).values() for f in fs}
    logs = []
    report = prep(_cfg(manifest, out, tok), codec=codec, log=logs.append)
    assert any("skipping 3 complete shard" in m for m in logs)
    assert report["accepted"] == 8 and report["shards"] == 3
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in mtimes} == mtimes
    # damage one file: only that shard is rebuilt, and it comes back identical
    with open(os.path.join(out, "shard_00001.codes.bin"), "ab") as f:
        f.write(b"\0")
    logs.clear()
    prep(_cfg(manifest, out, tok), codec=codec, log=logs.append)
    assert any("rebuilding shard_00001: checksum mismatch" in m for m in logs)
    assert any("skipping 2 complete shard" in m for m in logs)
    assert _files(out) == _files(clean)


def test_crash_mid_shard_leaves_no_partial_shard_listed(setup, tmp_path, monkeypatch):
    manifest, tok, codec, clean = setup
    out = str(tmp_path / "out")
    monkeypatch.setenv(CRASH_ENV, "4")  # shard 0 (3 items) completes, crash on shard 1's first item
    with pytest.raises(RuntimeError, match="injected crash"):
        prep(_cfg(manifest, out, tok), codec=codec, log=lambda m: None)
    listed = sh.load_list(os.path.join(out, sh.LIST_NAME))["shards"]
    assert [e["name"] for e in listed] == ["shard_00000"]
    assert not any(f.startswith("shard_00001") for f in os.listdir(out))
    assert any(f.startswith(".tmp.shard_00001") for f in os.listdir(out))  # the crash left its partial files
    assert not os.path.exists(os.path.join(out, sh.REPORT_NAME))
    monkeypatch.delenv(CRASH_ENV)
    logs = []
    report = prep(_cfg(manifest, out, tok), codec=codec, log=logs.append)
    assert any("skipping 1 complete shard" in m for m in logs)
    assert report["accepted"] == 8
    assert _files(out) == _files(clean)  # deterministic: same bytes as an uninterrupted run
    assert not any(f.startswith(".tmp.") for f in os.listdir(out))


def test_slices_then_merge(setup, tmp_path, capsys):
    manifest, tok, codec, clean = setup
    out = str(tmp_path / "out")
    prep(_cfg(manifest, out, tok, slice_index=1, num_slices=2), codec=codec, log=lambda m: None)
    assert sh.merge(out) is None  # slice 0 missing: nothing merged yet
    assert not os.path.exists(os.path.join(out, sh.LIST_NAME))
    prep(_cfg(manifest, out, tok, slice_index=0, num_slices=2), codec=codec, log=lambda m: None)
    assert sh.main(["merge", out]) == 0
    assert _files(out) == _files(clean)
    with open(os.path.join(out, sh.REPORT_NAME)) as f:
        report = json.load(f)
    assert report["seen"] == 8 and report["accepted"] == 8 and report["rejected"] == []
    assert report["tasks"]["speech"]["items"] == 4
