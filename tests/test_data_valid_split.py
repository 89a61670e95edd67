"""Validation hold-out at import (`unimoe data import --valid-fraction`): LJSpeech, LibriTTS and jsonl
layouts, stable under reruns and added items, no speaker on both sides, the source's own split kept; then
the README's own-corpus path: tokenizer, prep, `mix` of train and of valid.

Run: .venv/bin/pytest tests/test_data_valid_split.py
"""

import json
import os

import soundfile as sf

from data_prep.fixtures import tone
from data_prep.manifest import read_manifest
from data_prep.valid_split import assign_valid_split
from training.cli import main as cli


def _wav(path, seconds=0.3, freq=200):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, tone(seconds, 16000, freq), 16000)


def _splits(path):
    items, rejected, _ = read_manifest(path)
    assert rejected == []
    return {it.id: it.split for it in items}, {it.id: it.speaker for it in items}


def _ljspeech(root, n):
    lines = []
    for i in range(n):
        item = f"LJ001-{i:04d}"
        _wav(str(root / "wavs" / f"{item}.wav"), freq=150 + 10 * i)
        lines.append(f"{item}|Sentence number {i} is read aloud.|Sentence number {i} is read aloud.")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _import(fmt, src, out, *extra):
    assert cli(["data", "import", "--format", fmt, str(src), "--out", str(out), *extra]) == 0
    return _splits(str(out))


def test_ljspeech_split_is_stable_under_rerun_and_one_more_item(tmp_path, capsys):
    src = tmp_path / "LJSpeech-1.1"
    _ljspeech(src, 40)
    first, _ = _import("ljspeech", src, tmp_path / "a.jsonl", "--valid-fraction", "0.2")
    held = {k for k, s in first.items() if s == "valid"}
    assert 0 < len(held) < 40 and set(first.values()) == {"train", "valid"}
    assert "speech: held out" in capsys.readouterr().out
    again, _ = _import("ljspeech", src, tmp_path / "b.jsonl", "--valid-fraction", "0.2")
    assert again == first
    _ljspeech(src, 41)  # one more item: every earlier item keeps its split
    more, _ = _import("ljspeech", src, tmp_path / "c.jsonl", "--valid-fraction", "0.2")
    assert {k: more[k] for k in first} == first and len(more) == 41


def test_speakers_never_straddle_and_existing_split_is_kept(tmp_path):
    root = tmp_path / "LibriTTS" / "train-clean-100"
    for spk in range(12):
        for utt in range(3):
            name = f"{100 + spk}_7_{utt:06d}_000000"
            d = root / str(100 + spk) / "7"
            _wav(str(d / f"{name}.wav"))
            (d / f"{name}.normalized.txt").write_text(f"Speaker {spk} says line {utt}.")
    splits, speakers = _import("libritts", tmp_path / "LibriTTS", tmp_path / "l.jsonl",
                               "--valid-fraction", "0.25")
    by_speaker = {}
    for k, s in splits.items():
        by_speaker.setdefault(speakers[k], set()).add(s)
    assert all(len(s) == 1 for s in by_speaker.values())  # no speaker on both sides
    assert 1 <= sum(s == {"valid"} for s in by_speaker.values()) < 12
    # with a dev subset the source's split is kept: nothing of train-clean-100 is held out
    dev = tmp_path / "LibriTTS" / "dev-clean" / "900" / "1"
    _wav(str(dev / "900_1_000000_000000.wav"))
    (dev / "900_1_000000_000000.normalized.txt").write_text("A dev line.")
    splits, _ = _import("libritts", tmp_path / "LibriTTS", tmp_path / "l2.jsonl", "--valid-fraction", "0.25")
    assert {k for k, s in splits.items() if s == "valid"} == {"900_1_000000_000000"}


def test_cap_and_minimum_and_zero(tmp_path):
    entries = [{"id": f"m{i}", "task": "music", "text": "x", "audio": "a"} for i in range(50)]
    assign_valid_split(entries, 0.5, max_items=5)
    assert sum(e["split"] == "valid" for e in entries) == 5
    two = [{"id": f"s{i}", "task": "speech", "text": "x", "audio": "a"} for i in range(2)]
    assign_valid_split(two, 0.0001)  # no hash below the fraction: the smallest one still goes to valid
    assert sorted(e["split"] for e in two) == ["train", "valid"]
    one = [{"id": "only", "task": "speech", "text": "x", "audio": "a"}]
    assign_valid_split(one, 0.5)  # a single item stays in train
    assert one[0]["split"] == "train"
    none = [{"id": f"s{i}", "task": "speech", "text": "x", "audio": "a"} for i in range(9)]
    assign_valid_split(none, 0.0)
    assert {e["split"] for e in none} == {"train"}


def test_own_corpus_path_mixes_train_and_valid(tmp_path, capsys):
    """The README's own-corpus commands on an LJSpeech folder and a captioned music jsonl."""
    _ljspeech(tmp_path / "LJ", 12)
    caps = tmp_path / "caps"
    rows = []
    for i in range(8):
        _wav(str(caps / "audio" / f"c{i}.wav"), freq=300 + 20 * i)
        rows.append({"ytid": f"clip{i}", "path": f"audio/c{i}.wav", "caption": f"a calm piano piece {i}"})
    (caps / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = tmp_path / "data"
    speech, music = str(d / "speech.jsonl"), str(d / "music.jsonl")
    assert cli(["data", "import", "--format", "ljspeech", str(tmp_path / "LJ"), "--out", speech]) == 0
    assert cli(["data", "import", "--format", "jsonl", str(caps / "caps.jsonl"), "--task", "music",
                "--out", music]) == 0
    assert cli(["data", "tokenizer", "--manifest", speech, music, "--vocab-size", "60",
                "--out", str(d / "spm.model")]) == 0
    for task, manifest in (("speech", speech), ("music", music)):
        assert cli(["data", "prep", "--manifest", manifest, "--out", str(d / task), "--tokenizer",
                    str(d / "spm.model"), "--codec", "random", "--workers", "0"]) == 0
    counts = {}
    for split in ("train", "valid"):
        out = str(d / f"{split}.json")
        assert cli(["data", "mix", "--source", f"speech={d / 'speech'}", "--source", f"music={d / 'music'}",
                    "--ratio", "speech=1,music=1", "--split", split, "--out", out]) == 0
        with open(out) as f:
            counts[split] = json.load(f)["counts"]
    assert counts["valid"]["speech"] >= 1 and counts["valid"]["music"] >= 1
    assert counts["train"]["speech"] + counts["valid"]["speech"] == 12
    assert counts["train"]["music"] + counts["valid"]["music"] == 8
    # swapped sources: the error says which --source holds what
    capsys.readouterr()
    assert cli(["data", "mix", "--source", f"speech={d / 'music'}", "--source", f"music={d / 'speech'}",
                "--ratio", "speech=1,music=1", "--out", str(d / "swapped.json")]) == 2
    err = capsys.readouterr().err
    assert f"--source speech={d / 'music'} holds" in err and f"--source music={d / 'speech'} holds" in err
    assert "swapped --source?" in err
