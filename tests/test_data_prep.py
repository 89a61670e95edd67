"""Bad input never stops prep and never vanishes: one test corpus holds every bad case of issue 4.

Run: .venv/bin/pytest tests/test_data_prep.py
"""

import json
import os
import struct

import numpy as np
import pytest
import soundfile as sf

from data_prep.audio import AudioCheckConfig, DecodeJob, load_job, load_segments, windows
from data_prep.codec import load_codec
from data_prep.decode_pool import CRASH_ENV, HANG_ENV
from data_prep.fixtures import WORDS, tone
from data_prep.prep import PrepConfig, prep
from data_prep.shard_reader import ShardSet
from data_prep.text import train_tokenizer
from training.cli import main as cli

SR = 16000


@pytest.fixture(scope="module")
def codec():
    return load_codec("random", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "spm.model")
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 5)) for i in range(50)]
    train_tokenizer(texts + ["a slow calm piano melody in A minor"], path, vocab_size=64, log=lambda m: None)
    return path


def _wav(root, name, x, sr=SR, subtype="PCM_16"):
    sf.write(os.path.join(root, name), x, sr, subtype=subtype)
    return name


def _bad_corpus(root):
    """Returns (manifest path, {id: expected reason substring}, set of good ids)."""
    os.makedirs(root, exist_ok=True)
    good = tone(0.6, SR, 220)
    lines, expect = [], {}

    def add(item_id, audio, reason=None, task="speech", text="a red stone"):
        lines.append(json.dumps({"id": item_id, "task": task, "audio": audio, "text": text}))
        if reason:
            expect[item_id] = reason

    add("good_mono", _wav(root, "good.wav", good))
    stereo = np.stack([tone(0.8, 44100, 330), tone(0.8, 44100, 440)], axis=1)
    add("good_stereo_44k", _wav(root, "stereo.wav", stereo, sr=44100), task="music")
    full = open(os.path.join(root, "good.wav"), "rb").read()
    with open(os.path.join(root, "trunc.wav"), "wb") as f:
        f.write(full[: len(full) // 2])
    add("truncated", "trunc.wav", "truncated")
    with open(os.path.join(root, "corrupt.wav"), "wb") as f:
        f.write(full[:30])  # RIFF header, no data chunk
    add("corrupt", "corrupt.wav", "not decodable")
    with open(os.path.join(root, "notaudio.wav"), "w") as f:
        f.write("this is a text file pretending to be audio\n" * 20)
    add("not_audio", "notaudio.wav", "not decodable")
    add("missing", "nope.wav", "not found")
    open(os.path.join(root, "empty.wav"), "wb").close()
    add("zero_bytes", "empty.wav", "zero-length")
    add("zero_samples", _wav(root, "nosamples.wav", np.zeros(0, np.float32)), "zero-length")
    nan = good.copy()
    nan[100] = np.nan
    nan[200] = np.inf
    add("nan_inf", _wav(root, "nan.wav", nan, subtype="FLOAT"), "non-finite")
    add("too_short", _wav(root, "short.wav", tone(0.05, SR, 220)), "too short")
    add("too_long", _wav(root, "long.wav", tone(3.5, SR, 220)), "too long")
    add("empty_text", "good.wav", "empty text", text="   ")
    add("bad_task", "good.wav", "field 'task'", task="video")
    lines.append(json.dumps({"id": "no_text", "task": "speech", "audio": "good.wav"}))
    expect["no_text"] = "missing field 'text'"
    lines.append(
        json.dumps({"id": 17, "task": "speech", "audio": "good.wav", "text": "x"})
    )  # id not a string
    lines.append('{"id": "broken", "task": "speech", ')  # not JSON
    lines.append(json.dumps(["a", "list"]))  # JSON, not an object
    add("good_mono", "good.wav", "duplicate id")  # second use of an id
    raw = [ln.encode() for ln in lines]
    raw.append(b'{"id": "latin1", "task": "speech", "audio": "good.wav", "text": "caf\xe9"}')
    expect["latin1"] = "UTF-8"
    path = os.path.join(root, "manifest.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(raw) + b"\n\n")
    return path, expect, {"good_mono", "good_stereo_44k"}


def test_every_bad_input_is_reported_and_the_rest_processed(tmp_path, codec, tokenizer):
    manifest, expect, good = _bad_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "prep")
    cfg = PrepConfig(
        manifest=manifest,
        out=out,
        tokenizer=tokenizer,
        codec="random",
        workers=0,
        max_seconds=3.0,
        min_seconds=0.2,
        shard_size=4,
        progress=False,
    )
    report = prep(cfg, codec=codec, log=lambda m: None)
    with open(os.path.join(out, "prep_report.json")) as f:
        assert json.load(f) == report
    assert report["accepted"] == len(good)
    assert report["seen"] == report["accepted"] + len(report["rejected"]) == 19
    by_id = {r["id"]: r for r in report["rejected"] if r["id"] is not None}
    for item_id, reason in expect.items():
        assert item_id in by_id, f"{item_id} not reported"
        assert reason in by_id[item_id]["reason"], (item_id, by_id[item_id])
        assert "path" in by_id[item_id]
    anonymous = [r for r in report["rejected"] if r["id"] is None]
    reasons = sorted(r["reason"].split(" (")[0] for r in anonymous)
    assert reasons == ["field 'id' must be a string, got int", "not a JSON object", "not valid JSON"]
    assert all(isinstance(r["line"], int) for r in anonymous)
    assert by_id["missing"]["path"].endswith("nope.wav")
    # accepted items: codes [K, ceil(samples_24k / 320)], text ids present, per-task totals
    ss = ShardSet(out)
    rows = {r["id"]: (s, j, r) for s in range(len(ss.shards)) for j, r in enumerate(ss.read_meta(s))}
    assert set(rows) == good
    s, j, meta = rows["good_stereo_44k"]
    codes, text_ids = ss.get(s, j)
    assert codes.shape == (8, int(np.ceil(0.8 * 24000 / 320)))
    assert codes.min() >= 0 and codes.max() < 1024 and len(text_ids) > 0
    assert report["tasks"]["music"]["items"] == 1 and report["tasks"]["speech"]["items"] == 1
    assert report["tasks"]["music"]["seconds"] == pytest.approx(0.8, abs=0.01)
    assert report["tasks"]["speech"]["tokens"] == 8 * int(np.ceil(0.6 * 24000 / 320))


def test_cli_exit_codes(tmp_path, tokenizer, capsys):
    manifest, _, _ = _bad_corpus(str(tmp_path / "corpus"))

    def prep_argv(manifest):
        return ["data", "prep", "--manifest", str(manifest), "--tokenizer", tokenizer, "--codec", "random",
                "--workers", "0"]

    base = prep_argv(manifest) + ["--max-seconds", "3"]
    assert cli(base + ["--out", str(tmp_path / "ok")]) == 0
    # nothing usable: every line bad
    bad = tmp_path / "allbad.jsonl"
    bad.write_text('not json\n{"id": "x", "task": "speech", "audio": "missing.wav", "text": "hi"}\n')
    capsys.readouterr()
    rc = cli(prep_argv(bad) + ["--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc != 0 and "nothing usable" in err
    # configuration errors: one line, non-zero
    (tmp_path / "junk.model").write_text("not a sentencepiece model")
    for extra, needle in [
        (["--codec-checkpoint", str(tmp_path / "no.th")], "does not exist"),
        (["--tokenizer", str(tmp_path / "junk.model")], "unusable tokenizer"),
        (["--slice", "3/2"], "--slice"),
        (["--out", "/proc/forbidden/out"], "not writable"),
    ]:
        argv = base + (["--out", str(tmp_path / "x")] if "--out" not in extra else []) + extra
        rc = cli(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and needle in err[-1], (extra, err)


def test_workers_pool_matches_inline(tmp_path, codec, tokenizer):
    manifest, _, good = _bad_corpus(str(tmp_path / "corpus"))
    reports = []
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}")
        cfg = PrepConfig(
            manifest=manifest,
            out=out,
            tokenizer=tokenizer,
            codec="random",
            workers=workers,
            max_seconds=3.0,
            shard_size=5,
            sort_window=3,
            progress=False,
        )
        reports.append(prep(cfg, codec=codec, log=lambda m: None))
    assert reports[0]["rejected"] == reports[1]["rejected"]
    a, b = ShardSet(str(tmp_path / "w0")), ShardSet(str(tmp_path / "w2"))
    assert [e["files"] for e in a.shards] == [e["files"] for e in b.shards]


def _prep(tmp_path, manifest, tokenizer, codec, **kw):
    cfg = dict(manifest=manifest, out=str(tmp_path / "prep"), tokenizer=tokenizer, codec="random", workers=0,
               shard_size=4, progress=False)
    return prep(PrepConfig(**{**cfg, **kw}), codec=codec, log=lambda m: None)


def _manifest(root, entries):
    path = os.path.join(root, "manifest.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_long_music_is_cut_into_windows_that_keep_the_caption(tmp_path, codec, tokenizer):
    root = str(tmp_path)
    _wav(root, "song.wav", tone(95.0, 8000, 330), sr=8000)
    caption = "a slow calm piano melody in A minor"
    manifest = _manifest(root, [{"id": "song", "task": "music", "audio": "song.wav", "text": caption}])
    report = _prep(tmp_path, manifest, tokenizer, codec)  # --max-seconds 30 (the default)
    assert report["rejected"] == [] and report["accepted"] == 4 and report["accepted_lines"] == 1
    ss = ShardSet(str(tmp_path / "prep"))
    rows = ss.read_meta(0)
    assert [r["id"] for r in rows] == ["song#0", "song#1", "song#2", "song#3"]
    assert [r["seconds"] for r in rows] == [30.0, 30.0, 30.0, 5.0]
    assert [r["start"] for r in rows] == [0.0, 30.0, 60.0, 90.0]
    assert {r["text"] for r in rows} == {caption}
    assert [ss.get(0, j)[0].shape for j in range(4)] == [(8, 2250)] * 3 + [(8, 375)]
    assert report["tasks"]["music"]["seconds"] == pytest.approx(95.0)


def test_window_hop_and_short_tail():
    x = np.zeros(95 * 100, dtype=np.float32)  # 95 s at 100 Hz
    assert [len(w) / 100 for w in windows(x, 100, 30, 20, 0.2)] == [30, 30, 30, 30, 15]  # starts 0 .. 80
    tail = x[: 90 * 100 + 10]  # 90.1 s: the 0.1 s tail is shorter than min_seconds
    assert [len(w) / 100 for w in windows(tail, 100, 30, None, 0.2)] == [30, 30, 30]
    assert len(windows(x[:3000], 100, 30, None, 0.2)) == 1


def test_speech_start_end_selects_a_segment_and_long_speech_says_so(tmp_path, codec, tokenizer):
    root = str(tmp_path)
    chapter = tone(40.0, 8000, 200)
    _wav(root, "chapter.wav", chapter, sr=8000)
    _wav(root, "part.wav", chapter[10 * 8000 : 12 * 8000 + 4000], sr=8000)  # 10.0 s ... 12.5 s
    manifest = _manifest(root, [
        {"id": "seg", "task": "speech", "audio": "chapter.wav", "text": "a stone", "start": 10, "end": 12.5},
        {"id": "whole", "task": "speech", "audio": "chapter.wav", "text": "a red stone"},
        {"id": "late", "task": "speech", "audio": "chapter.wav", "text": "a stone", "start": 39, "end": 45},
        {"id": "backwards", "task": "speech", "audio": "chapter.wav", "text": "x", "start": 5, "end": 2},
    ])
    report = _prep(tmp_path, manifest, tokenizer, codec)
    reasons = {r["id"]: r["reason"] for r in report["rejected"]}
    assert "too long: 40.00 s > max 30.0 s" in reasons["whole"] and "give start/end" in reasons["whole"]
    assert "past the end of the audio" in reasons["late"]
    assert "'end' (2) must be greater than 'start' (5)" in reasons["backwards"]
    assert report["accepted"] == 1
    ss = ShardSet(str(tmp_path / "prep"))
    (row,) = ss.read_meta(0)
    assert (row["id"], row["seconds"], row["start"]) == ("seg", 2.5, 10)
    cfg = AudioCheckConfig(24000, 0.2, 30.0)
    segment = load_segments(DecodeJob(os.path.join(root, "chapter.wav"), "speech", cfg, 10, 12.5))
    alone = load_segments(DecodeJob(os.path.join(root, "part.wav"), "speech", cfg))
    assert len(segment) == 1 and np.array_equal(segment[0], alone[0])


def _patch(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", value))


def test_wav_with_unknown_data_size_is_checked_against_the_file_size(tmp_path):
    cfg = AudioCheckConfig(24000, 0.2, 30.0)
    full = str(tmp_path / "full.wav")
    sf.write(full, np.stack([tone(1.0, SR, 220)] * 2, axis=1), SR, subtype="PCM_16")  # stereo: 4-byte frames
    data = open(full, "rb").read()
    assert data[36:40] == b"data"

    def variant(name, riff, size, keep):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(data[:keep])
        _patch(path, 40, size)
        if riff is not None:
            _patch(path, 4, riff)
        return load_job(DecodeJob(path, "speech", cfg))

    # a stream that was cut: the data size is unknown but the RIFF header still tells the full size
    pieces, reason = variant("half.wav", None, 0xFFFFFFFF, 44 + (len(data) - 44) // 2)
    assert pieces is None and "truncated WAV" in reason and "RIFF header declares" in reason
    # both sizes unknown and cut inside a frame
    pieces, reason = variant("odd.wav", 0xFFFFFFFF, 0xFFFFFFFF, len(data) - 1)
    assert pieces is None and "whole number of frames" in reason
    # a complete stream WAV (sizes unknown, data to the end of the file) is read whole
    pieces, reason = variant("stream.wav", 0xFFFFFFFF, 0xFFFFFFFF, len(data))
    assert reason is None and len(pieces[0]) == 24000


def _small_corpus(root, n=6):
    entries = []
    for i in range(n):
        _wav(root, f"c{i}.wav", tone(0.4, SR, 200 + 30 * i, seed=i))
        entries.append({"id": f"c{i}", "task": "speech", "audio": f"c{i}.wav", "text": "a red stone"})
    return _manifest(root, entries)


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_crashed_or_hung_decoder_rejects_its_item_and_prep_goes_on(tmp_path, codec, tokenizer, monkeypatch,
                                                                   fault):
    manifest = _small_corpus(str(tmp_path))
    monkeypatch.setenv(CRASH_ENV if fault == "crash" else HANG_ENV, "c2.wav")  # a worker segfaults / hangs
    report = _prep(tmp_path, manifest, tokenizer, codec, workers=2, shard_size=3, sort_window=2,
                   decode_timeout=3.0)
    (rejected,) = report["rejected"]
    assert rejected["id"] == "c2"
    if fault == "crash":
        assert rejected["reason"] == "decoder crashed (worker killed by SIGSEGV)"
    else:
        assert rejected["reason"].startswith("decoder timed out (no result after 3 s")
    assert report["accepted"] == 5 and report["decoder_restarts"] == 1
    assert [e["items"] for e in ShardSet(str(tmp_path / "prep")).shards] == [2, 3]
