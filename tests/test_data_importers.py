"""Importers: tiny fake LJSpeech, LibriTTS and MusicCaps-style jsonl trees -> valid manifests.

Run: .venv/bin/pytest tests/test_data_importers.py
"""

import json
import os

import soundfile as sf

from data_prep.fixtures import tone
from data_prep.manifest import read_manifest
from training.cli import main as cli


def _wav(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, tone(0.3, 16000, 200), 16000)


def _read(path):
    items, rejected, _ = read_manifest(path)
    assert rejected == []
    return {it.id: it for it in items}


def test_ljspeech(tmp_path, capsys):
    src = tmp_path / "LJSpeech-1.1"
    for i in (1, 2):
        _wav(str(src / "wavs" / f"LJ001-000{i}.wav"))
    (src / "metadata.csv").write_text(
        "LJ001-0001|Printing, in the only sense|Printing, in the only sense\n"
        "LJ001-0002|in being comparatively modern.|\n"
        "broken line without separator\n"
        "LJ001-0003|no audio for this one|no audio for this one\n",
        encoding="utf-8",
    )
    out = str(tmp_path / "lj.jsonl")
    assert cli(["data", "import", "--format", "ljspeech", str(src), "--out", out]) == 0
    captured = capsys.readouterr()
    assert "line 3" in captured.err and "1 with missing audio" in captured.out
    items = _read(out)
    assert set(items) == {"LJ001-0001", "LJ001-0002", "LJ001-0003"}
    assert items["LJ001-0002"].text == "in being comparatively modern."
    assert items["LJ001-0001"].task == "speech" and os.path.isabs(items["LJ001-0001"].audio)
    assert os.path.isfile(items["LJ001-0001"].audio)


def test_libritts(tmp_path, capsys):
    src = tmp_path / "LibriTTS" / "train-clean-100"
    for name, text in [("19_198_000000_000000", "Hello there."), ("19_198_000001_000000", "General Kenobi.")]:
        d = src / "19" / "198"
        _wav(str(d / f"{name}.wav"))
        (d / f"{name}.normalized.txt").write_text(text)
    d = src / "26" / "495"
    _wav(str(d / "26_495_000004_000000.wav"))
    (d / "26_495_000004_000000.original.txt").write_text("Original only.")
    _wav(str(d / "26_495_000005_000000.wav"))  # no transcript
    out = str(tmp_path / "libri.jsonl")
    assert cli(["data", "import", "--format", "libritts", str(tmp_path / "LibriTTS"), "--out", out]) == 0
    assert "no .normalized.txt" in capsys.readouterr().err
    items = _read(out)
    assert set(items) == {"19_198_000000_000000", "19_198_000001_000000", "26_495_000004_000000"}
    assert items["19_198_000001_000000"].text == "General Kenobi."
    assert items["26_495_000004_000000"].speaker == "26"


def test_jsonl_musiccaps_style(tmp_path, capsys):
    src = tmp_path / "caps"
    _wav(str(src / "audio" / "a.wav"))
    _wav(str(src / "audio" / "b.wav"))
    lines = [
        {"ytid": "-0Gj8", "path": "audio/a.wav", "caption": "A calm piano piece."},
        {"file": "audio/b.wav", "text": "Upbeat drums.", "split": "valid"},
        {"path": "audio/c.wav"},
    ]
    (src / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = str(tmp_path / "music.jsonl")
    assert cli(["data", "import", "--format", "jsonl", str(src / "caps.jsonl"), "--out", out]) == 0
    err = capsys.readouterr().err
    assert "line 3" in err and "line 4" in err
    items = _read(out)
    assert set(items) == {"-0Gj8", "b"}
    assert items["-0Gj8"].task == "music" and items["b"].split == "valid"
    assert items["b"].audio == str(src / "audio" / "b.wav")


def test_bad_sources(tmp_path, capsys):
    assert cli(["data", "import", "--format", "ljspeech", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "metadata.csv not found" in capsys.readouterr().err
    assert cli(["data", "import", "--format", "libritts", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert cli(["data", "import", "--format", "jsonl", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_invalid_utf8_is_rejected_and_reported_by_every_importer(tmp_path, capsys):
    lj = tmp_path / "LJ"
    _wav(str(lj / "wavs" / "LJ1.wav"))
    (lj / "metadata.csv").write_bytes(b"LJ1|good line|good line\nLJ2|caf\xe9 au lait|caf\xe9 au lait\n")
    lt = tmp_path / "LibriTTS" / "train-clean-100" / "1" / "2"
    for name, text in [("1_2_000000_000000", b"fine"), ("1_2_000001_000000", b"caf\xe9")]:
        _wav(str(lt / f"{name}.wav"))
        (lt / f"{name}.normalized.txt").write_bytes(text)
    js = tmp_path / "caps.jsonl"
    js.write_bytes(b'{"path": "a.wav", "caption": "ok"}\n{"path": "b.wav", "caption": "caf\xe9 au lait"}\n')
    cases = [("ljspeech", lj, "metadata.csv line 2: not valid UTF-8 (byte 7)", {"LJ1"}),
             ("libritts", tmp_path / "LibriTTS",
              "1_2_000001_000000.normalized.txt: transcript is not valid UTF-8", {"1_2_000000_000000"}),
             ("jsonl", js, "line 2: not valid UTF-8 (byte 33)", {"a"})]
    for fmt, src, problem, ids in cases:
        out = str(tmp_path / f"{fmt}.jsonl")
        assert cli(["data", "import", "--format", fmt, str(src), "--out", out]) == 0
        assert problem in capsys.readouterr().err, fmt
        items = _read(out)
        assert set(items) == ids and all("\ufffd" not in it.text for it in items.values())


def test_libritts_subsets_go_to_their_split(tmp_path):
    root = tmp_path / "LibriTTS"
    for subset in ("train-clean-360", "dev-clean", "test-other"):
        d = root / subset / "7" / "8"
        name = f"7_8_{subset.split('-')[0]}_000000"
        _wav(str(d / f"{name}.wav"))
        (d / f"{name}.normalized.txt").write_text("Some text.")
    out = str(tmp_path / "libri.jsonl")
    assert cli(["data", "import", "--format", "libritts", str(root), "--out", out]) == 0
    assert {k: it.split for k, it in _read(out).items()} == {
        "7_8_train_000000": "train", "7_8_dev_000000": "valid", "7_8_test_000000": "test"}
    dev = str(tmp_path / "dev.jsonl")  # the subset folder itself as the source
    assert cli(["data", "import", "--format", "libritts", str(root / "dev-clean"), "--out", dev]) == 0
    assert {it.split for it in _read(dev).values()} == {"valid"}
