"""`unimoe data import --format ljspeech|libritts|jsonl SRC --out manifest.jsonl`: manifests for public
layouts.

- ljspeech: SRC/metadata.csv with `id|transcript|normalized transcript`, audio in SRC/wavs/<id>.wav.
- libritts: SRC/**/<spk>_<chapter>_<utt>_<seg>.wav with <same>.normalized.txt (or .original.txt) beside it;
  the subset folder gives the split: train-* -> train, dev-* -> valid, test-* -> test.
- jsonl (MusicCaps-style): one object per line with a path (`audio`, `path`, `file` or `wav`, relative to
  the jsonl's folder) and a caption (`caption` or `text`); optional `id`, `task` (default `--task` or music).
Every entry gets a `split`: the source's own (LibriTTS folders, a jsonl `split`), else a deterministic
validation hold-out (`--valid-fraction`, data_prep/valid_split.py) and "train".
Audio paths are written absolute. Text is read as strict UTF-8. Lines the importer cannot parse (not UTF-8,
not JSON, missing fields) are listed on stderr with their number and left out; entries whose audio is
missing are still written (prep rejects and reports them) and counted here.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from data_prep.manifest import TASKS, write_manifest
from data_prep.valid_split import DEFAULT_VALID_FRACTION, DEFAULT_VALID_MAX_ITEMS, assign_valid_split

FORMATS = ("ljspeech", "libritts", "jsonl")
LIBRITTS_SPLITS = {"train": "train", "dev": "valid", "test": "test"}  # subset prefix -> manifest split
LIBRITTS_SUBSET = re.compile(r"^(train|dev|test)-(clean|other)(-\d+)?$")


class ImportError_(ValueError):
    """The source is not in the named layout; the message says what is missing."""


def _utf8_lines(path: str, what: str, problems: list[str]):
    """(line number, text) of the non-blank lines that are valid UTF-8; the others go to `problems`."""
    with open(path, "rb") as f:
        raw = f.read()
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield n, line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            problems.append(f"{what + ' ' if what else ''}line {n}: not valid UTF-8 (byte {e.start})")


def _libritts_split(wav: str, src: str) -> str | None:
    """The split of the subset folder (train-clean-100, dev-other, ...) the file is in, if any."""
    for part in os.path.relpath(wav, src).split(os.sep)[::-1] + os.path.abspath(src).split(os.sep)[::-1]:
        m = LIBRITTS_SUBSET.match(part)
        if m:
            return LIBRITTS_SPLITS[m.group(1)]
    return None


def import_ljspeech(src: str) -> tuple[list[dict], list[str]]:
    meta = os.path.join(src, "metadata.csv")
    if not os.path.isfile(meta):
        raise ImportError_(f"{src} is not an LJSpeech folder: metadata.csv not found")
    entries, problems = [], []
    for n, line in _utf8_lines(meta, "metadata.csv", problems):
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip():
            problems.append(f"metadata.csv line {n}: expected id|transcript[|normalized], got {line[:60]!r}")
            continue
        text = (parts[2] if len(parts) > 2 and parts[2].strip() else parts[1]).strip()
        item_id = parts[0].strip()
        entries.append(
            {
                "id": item_id,
                "task": "speech",
                "text": text,
                "speaker": "ljspeech",
                "audio": os.path.abspath(os.path.join(src, "wavs", item_id + ".wav")),
            }
        )
    return entries, problems


def import_libritts(src: str) -> tuple[list[dict], list[str]]:
    wavs = sorted(glob.glob(os.path.join(src, "**", "*.wav"), recursive=True))
    if not wavs:
        raise ImportError_(f"{src} is not a LibriTTS tree: no .wav files below it")
    entries, problems = [], []
    for wav in wavs:
        stem = wav[: -len(".wav")]
        text = None
        for suffix in (".normalized.txt", ".original.txt"):
            if os.path.isfile(stem + suffix):
                with open(stem + suffix, "rb") as f:
                    raw = f.read()
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    problems.append(f"{stem + suffix}: transcript is not valid UTF-8 (byte {e.start})")
                    text = ""
                break
        if text is None:
            problems.append(f"{wav}: no .normalized.txt or .original.txt transcript beside it")
        if not text:
            continue
        name = os.path.basename(stem)
        entry = {"id": name, "task": "speech", "text": text, "speaker": name.split("_")[0],
                 "audio": os.path.abspath(wav)}
        split = _libritts_split(wav, src)
        if split:
            entry["split"] = split
        entries.append(entry)
    return entries, problems


def import_jsonl(src: str, task: str | None = None) -> tuple[list[dict], list[str]]:
    if not os.path.isfile(src):
        raise ImportError_(f"{src} is not a file (the jsonl format takes a .jsonl file)")
    root = os.path.dirname(os.path.abspath(src))
    entries, problems = [], []
    for n, line in _utf8_lines(src, "", problems):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        path = next((obj[k] for k in ("audio", "path", "file", "wav") if isinstance(obj.get(k), str)), None)
        text = next((obj[k] for k in ("caption", "text") if isinstance(obj.get(k), str)), None)
        if path is None or text is None:
            problems.append(f"line {n}: needs a path (audio/path/file/wav) and a caption (caption/text)")
            continue
        t = obj.get("task") or task or "music"
        if t not in TASKS:
            problems.append(f"line {n}: task must be one of {', '.join(TASKS)}, got {t!r}")
            continue
        item_id = str(obj.get("id") or obj.get("ytid") or os.path.splitext(os.path.basename(path))[0])
        entry = {"id": item_id, "task": t, "text": text, "audio": os.path.normpath(os.path.join(root, path))}
        for k in ("duration", "speaker", "split", "start", "end"):
            if k in obj:
                entry[k] = obj[k]
        entries.append(entry)
    return entries, problems


def import_source(fmt: str, src: str, task: str | None = None) -> tuple[list[dict], list[str]]:
    if fmt == "ljspeech":
        return import_ljspeech(src)
    if fmt == "libritts":
        return import_libritts(src)
    if fmt == "jsonl":
        return import_jsonl(src, task)
    raise ImportError_(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def run_cli(args) -> int:
    try:
        entries, problems = import_source(args.format, args.src, getattr(args, "task", None))
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems[:20]:
        print(f"[import] skipped {p}", file=sys.stderr)
    if len(problems) > 20:
        print(f"[import] ... and {len(problems) - 20} more skipped lines", file=sys.stderr)
    if not entries:
        print(f"error: no usable entries found in {args.src}", file=sys.stderr)
        return 1
    try:
        notes = assign_valid_split(entries, getattr(args, "valid_fraction", DEFAULT_VALID_FRACTION),
                                   getattr(args, "valid_max_items", DEFAULT_VALID_MAX_ITEMS))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_manifest(args.out, entries)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    missing = sum(not os.path.isfile(e["audio"]) for e in entries)
    note = f" ({missing} with missing audio: prep will reject them)" if missing else ""
    print(f"[import] {len(entries)} entries -> {args.out}{note}; {len(problems)} lines skipped")
    for line in notes:
        print(f"[import] split: {line}")
    return 0
