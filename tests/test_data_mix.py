"""The mixture: target ratio over every 1000-sample window, determinism by index, upsampling, splits.

Run: .venv/bin/pytest tests/test_data_mix.py
"""

import json
import os
import pickle
from collections import Counter

import numpy as np
import pytest

from data_prep.codec import CodecUnavailable, load_codec
from data_prep.fixtures import corpus_with_tokenizer
from data_prep.mix import MixtureReader, build_mix
from data_prep.mix_index import ITEM_ARRAYS
from data_prep.prep import PrepConfig, prep
from data_prep.text import SEP_ID, TASK_TOKEN_IDS, TEXT_PAD_ID, UNK_ID, load_tokenizer, train_tokenizer
from training.cli import main as cli


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    """6 speech (1 valid) and 3 music (1 valid) clips, prepared with the random codec."""
    root = tmp_path_factory.mktemp("mix")
    manifest, tok = corpus_with_tokenizer(str(root), speech=6, music=3, seconds=0.3, valid=1)
    out = str(root / "prep")
    prep(
        PrepConfig(
            manifest=manifest, out=out, tokenizer=tok, codec="random", workers=0, shard_size=4, progress=False
        ),
        codec=load_codec("random"),
        log=lambda m: None,
    )
    return root, out, tok


def _window_share(tasks, task, window=1000):
    x = np.asarray([t == task for t in tasks], dtype=np.float64)
    c = np.concatenate([[0], np.cumsum(x)])
    return (c[window:] - c[:-window]) / window  # share of `task` in every window of `window` samples


@pytest.mark.parametrize(
    "ratio", [{"speech": 1.0, "music": 1.0}, {"speech": 4.0, "music": 1.0}, {"speech": 1.0, "music": 3.0}]
)
def test_ratio_holds_in_every_window(prepped, tmp_path, ratio):
    _, out, _ = prepped
    path = str(tmp_path / "mix.json")
    build_mix([("speech", out), ("music", out)], path, ratio=ratio, seed=3)
    r = MixtureReader(path)
    target = ratio["speech"] / sum(ratio.values())
    tasks = [r.task_of(i) for i in range(6000)]
    shares = _window_share(tasks, "speech")
    assert np.abs(shares - target).max() <= 0.02
    # also far away from the start (resume at step 10^9)
    far = [r.task_of(i) for i in range(10**9, 10**9 + 2000)]
    assert np.abs(_window_share(far, "speech") - target).max() <= 0.02
    assert all(r[i]["task"] == tasks[i] for i in range(0, 60, 7))


def test_deterministic_by_index_and_resumable(prepped, tmp_path):
    _, out, _ = prepped
    path = str(tmp_path / "mix.json")
    build_mix([("speech", out), ("music", out)], path, ratio={"speech": 1, "music": 1}, seed=7)
    a, b = MixtureReader(path), pickle.loads(pickle.dumps(MixtureReader(path)))
    for i in [0, 1, 5, 123, 10**6 + 3, 2**40]:
        x, y = a[i], b[i]
        assert x["id"] == y["id"] and x["task"] == y["task"]
        assert np.array_equal(x["codes"], y["codes"]) and np.array_equal(x["text_ids"], y["text_ids"])
    # reading out of order gives the same as in order (no hidden iterator state)
    forward = [a[i]["id"] for i in range(40)]
    assert [b[i]["id"] for i in reversed(range(40))] == forward[::-1]
    other = str(tmp_path / "other.json")
    build_mix([("speech", out), ("music", out)], other, ratio={"speech": 1, "music": 1}, seed=8)
    assert [MixtureReader(other)[i]["id"] for i in range(40)] != forward


def test_epoch_upsamples_smaller_side_and_respects_split(prepped, tmp_path):
    _, out, _ = prepped
    path = str(tmp_path / "mix.json")
    mix = build_mix([("speech", out), ("music", out)], path, ratio={"speech": 1, "music": 1})
    r = MixtureReader(path)
    assert mix["counts"] == {"speech": 5, "music": 2} and len(r) == 10
    ids = Counter(r[i]["id"] for i in range(len(r)))
    speech = {k: v for k, v in ids.items() if k.startswith("speech")}
    music = {k: v for k, v in ids.items() if k.startswith("music")}
    assert sorted(speech) == [f"speech_{i:04d}" for i in range(5)] and set(speech.values()) == {1}
    assert sorted(music) == ["music_0000", "music_0001"] and sum(music.values()) == 5  # upsampled 2.5x
    sample = r[0]
    assert set(sample) == {"id", "task", "text_ids", "codes"}
    assert sample["codes"].shape[0] == 8 and sample["codes"].dtype == np.int64
    assert r.codec_info["trained"] is False and r.tokenizer_path.endswith("spm.model")
    valid = str(tmp_path / "valid.json")
    build_mix([("speech", out), ("music", out)], valid, ratio={"speech": 1, "music": 1}, split="valid")
    assert {MixtureReader(valid)[i]["id"] for i in range(8)} == {"speech_0005", "music_0002"}


def test_temperature_single_task_and_seed_subset(prepped, tmp_path):
    _, out, _ = prepped
    t1 = build_mix([("speech", out), ("music", out)], str(tmp_path / "t1.json"), temperature=1.0)
    assert t1["weights"]["speech"] == pytest.approx(5 / 7)
    tinf = build_mix([("speech", out), ("music", out)], str(tmp_path / "t.json"), temperature=1e9)
    assert tinf["weights"]["speech"] == pytest.approx(0.5, abs=1e-6)
    one = str(tmp_path / "speech.json")
    build_mix([("speech", out)], one, ratio={"speech": 1})
    assert {MixtureReader(one).task_of(i) for i in range(50)} == {"speech"}
    seed = str(tmp_path / "seed.json")
    build_mix([("speech", out), ("music", out)], seed, ratio={"speech": 1, "music": 1}, max_items=2)
    r = MixtureReader(seed)
    assert len({r[i]["id"] for i in range(40)}) == 4
    with pytest.raises(ValueError, match="--ratio must name"):
        build_mix([("speech", out)], str(tmp_path / "bad.json"), ratio={"speech": 1, "music": 1})


def test_mix_cli(prepped, tmp_path, capsys):
    _, out, _ = prepped
    path = str(tmp_path / "mix.json")
    assert (
        cli(
            [
                "data",
                "mix",
                "--source",
                f"speech={out}",
                "--source",
                f"music={out}",
                "--ratio",
                "speech=1,music=1",
                "--out",
                path,
            ]
        )
        == 0
    )
    assert "UNTRAINED" in capsys.readouterr().out
    assert (
        cli(["data", "mix", "--source", f"speech={tmp_path}/nothing", "--temperature", "2", "--out", path])
        == 2
    )
    assert "no shards.json" in capsys.readouterr().err


def test_tokenizer_special_ids_and_clamp(prepped, tmp_path):
    _, _, tok_path = prepped
    tok = load_tokenizer(tok_path)
    sp = tok.sp
    assert (TEXT_PAD_ID, UNK_ID, SEP_ID) == (0, 1, 4) and TASK_TOKEN_IDS == {"speech": 2, "music": 3}
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<speech>", "<music>", "<sep>"]
    assert sp.bos_id() == -1 and sp.eos_id() == -1
    ids = tok.encode("red stone <sep> river")
    assert SEP_ID not in ids.tolist() and len(ids) > 0
    logs = []
    info = train_tokenizer(["tiny corpus", "of two lines"], str(tmp_path / "s.model"), 5000, log=logs.append)
    assert info["vocab_size"] < 5000 and "largest reachable size" in logs[0]


def test_data_of_the_old_random_codec_is_refused_with_rerun_prep(prepped, tmp_path):
    _, out, _ = prepped
    path = tmp_path / "mix.json"
    mix = build_mix([("speech", out), ("music", out)], str(path), ratio={"speech": 1, "music": 1})
    del mix["codec"]["random_init"]  # a mix of shards prepared before the codec became deterministic
    path.write_text(json.dumps(mix))
    with pytest.raises(CodecUnavailable, match="mix.json was made with an older random codec .* re-run"):
        MixtureReader(str(path))


def test_index_is_compact_memory_mapped_and_scans_a_directory_once(prepped, tmp_path):
    _, out, _ = prepped
    path = str(tmp_path / "mix.json")
    mix = build_mix([("speech", out), ("music", out)], path, ratio={"speech": 1, "music": 1})
    assert mix["dirs"] == [os.path.relpath(out, str(tmp_path))] and mix["version"] == 2
    assert os.path.getsize(str(tmp_path / "mix.index")) == mix["index"]["bytes"]
    items = sum(mix["counts"].values())
    per_item = sum(np.dtype(mix["index"]["arrays"][n]["dtype"]).itemsize for n in ITEM_ARRAYS)
    assert per_item <= 16
    r = MixtureReader(path)
    base = r.arrays["item_shard"]
    while not isinstance(base, np.memmap):  # a view of the read-only map of the index file
        base = base.base
    assert base.filename == str(tmp_path / "mix.index") and base.mode == "r"
    assert len(r.arrays["shard_index"]) == 3 and len(r.arrays["item_row"]) == items  # 3 shards, listed once
    for i in range(20):  # lengths come from the index, without reading a shard
        s = r[i]
        assert r.lengths(i) == (len(s["text_ids"]), s["codes"].shape[1])


def test_mix_json_version_1_reads_the_same_samples(prepped, tmp_path):
    """A mix.json written before the index existed (absolute dirs, no index) is still read, identically."""
    _, out, _ = prepped
    path = str(tmp_path / "mix.json")
    mix = build_mix([("speech", out), ("music", out)], path, ratio={"speech": 1, "music": 1}, seed=4,
                    max_items=3)
    old = {k: v for k, v in mix.items() if k not in ("index", "dirs", "tokenizer_sha256")}
    old.update(version=1, sources=[{"task": t, "dir": out, "items": 0} for t in ("speech", "music")],
               tokenizer=os.path.normpath(os.path.join(str(tmp_path), mix["tokenizer"])))
    with open(tmp_path / "old.json", "w") as f:
        json.dump(old, f)
    a, b = MixtureReader(path), MixtureReader(str(tmp_path / "old.json"))
    for i in range(30):
        x, y = a[i], b[i]
        assert x["id"] == y["id"] and np.array_equal(x["codes"], y["codes"])
