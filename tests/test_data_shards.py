"""Shards: re-runs skip complete shards, a crash mid-shard lists nothing partial, slices merge.

Run: .venv/bin/pytest tests/test_data_shards.py
"""

import json
import os

import numpy as np
import pytest

from data_prep import shards as sh
from data_prep.codec import load_codec
from data_prep.fixtures import corpus_with_tokenizer, write_corpus, write_synthetic_shards
from data_prep.mix import MixtureReader, build_mix
from data_prep.prep import CRASH_ENV, PrepConfig, prep
from data_prep.shard_reader import ShardCheckError
from training.cli import main as cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest, tok = corpus_with_tokenizer(str(root), speech=4, music=4, seconds=0.5)
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
    # damage one file (same size): only that shard is rebuilt, and it comes back identical
    with open(os.path.join(out, "shard_00001.codes.bin"), "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
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
    assert sh.merge(out, wait=True) is None  # slice 0 missing: an array task does not merge yet
    assert sh.main(["merge", out]) == 3  # by hand: an error that names the slice
    assert "incomplete: 0/2" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, sh.LIST_NAME))
    prep(_cfg(manifest, out, tok, slice_index=0, num_slices=2), codec=codec, log=lambda m: None)
    assert sh.main(["merge", out]) == 0
    assert _files(out) == _files(clean)
    with open(os.path.join(out, sh.REPORT_NAME)) as f:
        report = json.load(f)
    assert report["seen"] == 8 and report["accepted"] == 8 and report["rejected"] == []
    assert report["tasks"]["speech"]["items"] == 4


def _append_lines(manifest, extra_root, n):
    """n more speech lines (new clips) at the end of the manifest."""
    extra = write_corpus(extra_root, speech=n, music=0, seconds=0.5, seed=5)
    with open(extra) as f:
        lines = [json.loads(line) for line in f]
    with open(manifest, "a") as f:
        for e in lines:
            e["id"] = "more_" + e["id"]
            e["audio"] = os.path.join(extra_root, e["audio"])
            f.write(json.dumps(e) + "\n")


def test_stale_slice_report_is_not_taken_for_a_complete_slice(setup, tmp_path, monkeypatch, capsys):
    _, tok, codec, _ = setup
    root = tmp_path / "corpus"
    manifest = write_corpus(str(root), speech=4, music=4, seconds=0.5)  # 8 lines: shards 0-2 of 3
    out = str(tmp_path / "out")
    for i in (0, 1):
        prep(_cfg(manifest, out, tok, slice_index=i, num_slices=2), codec=codec, log=lambda m: None)
    assert sh.main(["merge", out]) == 0
    old_report = open(os.path.join(out, sh.report_name(1, 2))).read()
    _append_lines(manifest, str(tmp_path / "extra"), 6)  # 14 lines: shards 0-4, shard 3 is slice 1's
    prep(_cfg(manifest, out, tok, slice_index=0, num_slices=2), codec=codec, log=lambda m: None)
    monkeypatch.setenv(CRASH_ENV, "1")  # slice 1 crashes on its first new item
    with pytest.raises(RuntimeError, match="injected crash"):
        prep(_cfg(manifest, out, tok, slice_index=1, num_slices=2), codec=codec, log=lambda m: None)
    monkeypatch.delenv(CRASH_ENV)
    capsys.readouterr()
    assert sh.main(["merge", out]) == 3  # the crashed slice has no report: not complete
    assert "incomplete: 1/2" in capsys.readouterr().err
    assert sh.merge(out, wait=True) is None
    # a slice report from before the manifest grew (a task that was not re-run) does not count either
    with open(os.path.join(out, sh.report_name(1, 2)), "w") as f:
        f.write(old_report)
    listing = sh.load_list(os.path.join(out, sh.list_name(1, 2)))
    old_key = sh.load_list(os.path.join(out, sh.LIST_NAME))["manifest_key"]
    stale = dict(listing, total_shards=3, manifest_key=old_key)
    sh.write_json_atomic(os.path.join(out, sh.list_name(1, 2)), stale)
    assert sh.main(["merge", out]) == 3
    err = capsys.readouterr().err
    assert "the slices were made from different versions of the manifest" in err
    assert f"0/2: 5 shards, manifest {listing['manifest_key']}; 1/2: 3 shards, manifest {old_key}" in err
    assert len(sh.load_list(os.path.join(out, sh.LIST_NAME))["shards"]) == 3  # the old merge, untouched
    prep(_cfg(manifest, out, tok, slice_index=1, num_slices=2), codec=codec, log=lambda m: None)
    assert sh.main(["merge", out]) == 0
    merged = sh.load_list(os.path.join(out, sh.LIST_NAME))
    assert [e["index"] for e in merged["shards"]] == [0, 1, 2, 3, 4] and merged["total_shards"] == 5
    with open(os.path.join(out, sh.REPORT_NAME)) as f:
        assert json.load(f)["accepted"] == 14


def test_merge_names_missing_shards(setup, tmp_path, capsys):
    manifest, tok, codec, _ = setup
    out = str(tmp_path / "out")
    for i in (0, 1):
        prep(_cfg(manifest, out, tok, slice_index=i, num_slices=2), codec=codec, log=lambda m: None)
    path = os.path.join(out, sh.list_name(0, 2))
    listing = sh.load_list(path)
    sh.write_json_atomic(path, dict(listing, shards=[e for e in listing["shards"] if e["index"] != 2]))
    capsys.readouterr()
    assert sh.main(["merge", out]) == 3
    err = capsys.readouterr().err
    assert "1 of 3 shards missing after all slices completed (shard_00002 (slice 0))" in err


def test_moved_data_root_resumes(setup, tmp_path):
    _, _, codec, _ = setup
    root = tmp_path / "data"
    manifest, _ = corpus_with_tokenizer(str(root), speech=4, music=4, seconds=0.5)
    prep(_cfg(manifest, str(root / "prep"), str(root / "spm.model")), codec=codec, log=lambda m: None)
    build_mix([("speech", str(root / "prep")), ("music", str(root / "prep"))], str(root / "mix.json"),
              ratio={"speech": 1, "music": 1})
    before = [MixtureReader(str(root / "mix.json"))[i]["id"] for i in range(12)]
    moved = tmp_path / "mnt" / "data"
    os.makedirs(moved.parent)
    os.rename(root, moved)
    logs = []
    report = prep(_cfg(str(moved / "manifest.jsonl"), str(moved / "prep"), str(moved / "spm.model")),
                  codec=codec, log=logs.append)
    assert any("skipping 3 complete shard" in m for m in logs) and not any("rebuilding" in m for m in logs)
    assert report["accepted"] == 8
    reader = MixtureReader(str(moved / "mix.json"))
    assert [reader[i]["id"] for i in range(12)] == before
    assert reader.tokenizer_path == str(moved / "spm.model")


def test_reader_keeps_at_most_max_open_shards(tmp_path):
    prep_dir, mix = str(tmp_path / "prep"), str(tmp_path / "mix.json")
    write_synthetic_shards(prep_dir, items=1200, shards=300)
    build_mix([("speech", prep_dir), ("music", prep_dir)], mix, ratio={"speech": 1, "music": 1})
    baseline = len(os.listdir("/proc/self/fd"))
    reader = MixtureReader(mix, max_open_shards=8)
    most = 0
    for i in np.random.default_rng(0).permutation(len(reader)):
        sample = reader[int(i)]
        most = max(most, len(os.listdir("/proc/self/fd")))
    assert sample["codes"].shape[0] == 8
    assert reader.shards.opened > 250 and len(reader.shards) == 8  # 300 shards went through the cache
    assert most <= baseline + 8 + 2  # one descriptor per open shard (+ the index map, + listdir's own)
    reader.close()
    assert len(os.listdir("/proc/self/fd")) <= baseline + 2


def test_cheap_check_at_open_and_full_verify(tmp_path, capsys):
    prep_dir, mix = str(tmp_path / "prep"), str(tmp_path / "mix.json")
    write_synthetic_shards(prep_dir, items=40, shards=4)
    build_mix([("speech", prep_dir), ("music", prep_dir)], mix, ratio={"speech": 1, "music": 1})
    assert cli(["data", "verify", prep_dir]) == 0 and cli(["data", "verify", mix]) == 0
    capsys.readouterr()
    with open(os.path.join(prep_dir, "shard_00001.codes.idx"), "r+b") as f:  # same size, other content
        f.seek(40)
        f.write(b"\x07")
    with open(os.path.join(prep_dir, "shard_00002.codes.bin"), "ab") as f:
        f.write(b"\0\0")
    reader = MixtureReader(mix)
    table = list(reader.arrays["shard_index"])  # the index's shard table: one dir here, shards 0-3
    assert table == [0, 1, 2, 3]
    reader._open(0)
    with pytest.raises(ShardCheckError, match=r"shard_00001\.codes\.idx: sha256 differs.*unimoe data verify"):
        reader._open(1)
    with pytest.raises(ShardCheckError, match=r"shard_00002\.codes\.bin: \d+ bytes, expected"):
        reader._open(2)
    capsys.readouterr()
    assert cli(["data", "verify", mix]) == 1
    out = capsys.readouterr().out
    assert "shard_00001: checksum mismatch for shard_00001.codes.idx" in out
    assert "shard_00002: size of shard_00002.codes.bin" in out and "FAILED" in out
