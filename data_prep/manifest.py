"""The manifest: one JSON object per line, the contract every data command shares.

    {"id": "ls_0001", "task": "speech", "audio": "wavs/ls_0001.wav", "text": "Hello there.",
     "duration": 1.9, "speaker": "p1", "split": "train"}

`id` (unique non-empty string), `task` ("speech" | "music"), `audio` (path, absolute or relative to the
manifest's folder), `text` (transcript or caption, non-empty); optional `duration` (seconds), `speaker`,
`split` (default "train"), `start`/`end` (seconds: the segment of a long file to use). `read_manifest`
returns the valid items and one rejection per bad line with its
reason; blank lines are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

TASKS = ("speech", "music")
REQUIRED = ("id", "task", "audio", "text")


@dataclass
class ManifestItem:
    id: str
    task: str
    audio: str  # absolute path
    text: str
    line: int  # 1-based line number in the manifest
    duration: float | None = None
    speaker: str | None = None
    split: str = "train"
    start: float | None = None  # seconds: the segment [start, end) of the file
    end: float | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "line"}
        return d


def reject(item_id, path, reason: str, line: int | None = None) -> dict:
    out = {"id": item_id, "path": path, "reason": reason}
    if line is not None:
        out["line"] = line
    return out


def _check_fields(obj: dict) -> str | None:
    for key in REQUIRED:
        if key not in obj:
            return f"missing field '{key}'"
    for key in REQUIRED:
        if not isinstance(obj[key], str):
            return f"field '{key}' must be a string, got {type(obj[key]).__name__}"
    if not obj["id"].strip():
        return "field 'id' is empty"
    if obj["task"] not in TASKS:
        return f"field 'task' must be one of {', '.join(TASKS)}, got {obj['task']!r}"
    if not obj["audio"].strip():
        return "field 'audio' is empty"
    if not obj["text"].strip():
        return "empty text (transcript/caption)"
    dur = obj.get("duration")
    if dur is not None and (isinstance(dur, bool) or not isinstance(dur, (int, float)) or dur < 0):
        return f"field 'duration' must be a non-negative number, got {dur!r}"
    for key in ("start", "end"):
        v = obj.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            return f"field '{key}' must be a non-negative number of seconds, got {v!r}"
    if obj.get("start") is not None and obj.get("end") is not None and obj["end"] <= obj["start"]:
        return f"field 'end' ({obj['end']}) must be greater than 'start' ({obj['start']})"
    for key in ("speaker", "split"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            return f"field '{key}' must be a string, got {type(obj[key]).__name__}"
    return None


def read_manifest(path: str) -> tuple[list[ManifestItem], list[dict], int]:
    """Parse a manifest. Returns (items, rejected, seen) where seen counts the non-blank lines."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    items: list[ManifestItem] = []
    rejected: list[dict] = []
    first_line: dict[str, int] = {}
    seen = 0
    for n, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        seen += 1
        try:
            text = raw.decode("utf-8")
            bad_utf8 = None
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", errors="replace")
            bad_utf8 = f"text is not valid UTF-8 (byte {e.start} of line {n})"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rejected.append(
                reject(None, None, bad_utf8 or f"not valid JSON ({e.msg} at column {e.colno})", n)
            )
            continue
        if not isinstance(obj, dict):
            rejected.append(reject(None, None, f"not a JSON object (got {type(obj).__name__})", n))
            continue
        item_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        audio = obj.get("audio") if isinstance(obj.get("audio"), str) else None
        audio_path = os.path.normpath(os.path.join(root, audio)) if audio else None
        reason = bad_utf8 or _check_fields(obj)
        if reason is None and item_id in first_line:
            reason = f"duplicate id (first seen on line {first_line[item_id]})"
        if reason is not None:
            rejected.append(reject(item_id, audio_path, reason, n))
            continue
        first_line[item_id] = n
        items.append(
            ManifestItem(
                id=item_id,
                task=obj["task"],
                audio=audio_path,
                text=obj["text"].strip(),
                line=n,
                duration=obj.get("duration"),
                speaker=obj.get("speaker"),
                split=obj.get("split") or "train",
                start=obj.get("start"),
                end=obj.get("end"),
            )
        )
    return items, rejected, seen


def write_manifest(path: str, entries: list[dict]) -> None:
    """Write entries (dicts with at least the required fields) atomically as jsonl."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
