"""What a complete checkpoint is: tag names, the COMPLETE manifest, finding and verifying tags.

    RUN/checkpoints/latest               the newest complete tag (written after its COMPLETE)
    RUN/checkpoints/step_00000040/       one tag; COMPLETE is its last file:
        COMPLETE                         {"step": 40, "files": {"relative/path": size in bytes, ...}}

Rank 0 writes COMPLETE only after every rank reported its files written and fsynced, so a tag without it
(a crash or a failed write mid-save) is invisible to `--resume auto` and deleted later. `verify` checks the
listed files against the disk and names each missing or truncated one.
"""

from __future__ import annotations

import json
import os
import re

CKPT_SUBDIR = "checkpoints"
COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message names the path and what is wrong."""


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag_dir: str) -> int:
    return int(TAG_RE.match(os.path.basename(tag_dir.rstrip("/"))).group(1))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def list_files(tag_dir: str) -> dict[str, int]:
    """{path relative to the tag: size} of every file below the tag except COMPLETE and *.tmp leftovers."""
    out = {}
    for root, _, files in os.walk(tag_dir):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, tag_dir)
            if rel != COMPLETE and not f.endswith(".tmp"):
                out[rel] = os.path.getsize(path)
    return dict(sorted(out.items()))


def write_complete(tag_dir: str, step: int) -> dict[str, int]:
    files = list_files(tag_dir)
    write_atomic(os.path.join(tag_dir, COMPLETE), json.dumps({"step": step, "files": files}, indent=0))
    return files


def read_complete(tag_dir: str) -> dict:
    """The manifest; a COMPLETE of an older version holds only the step (its files cannot be checked)."""
    with open(os.path.join(tag_dir, COMPLETE)) as f:
        text = f.read()
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        return {"step": int(text.strip() or -1), "files": None}
    return manifest


def verify(tag_dir: str) -> dict[str, int]:
    """Raise CheckpointError naming every listed file that is missing or has another size."""
    files = read_complete(tag_dir)["files"]
    if files is None:
        return {}
    missing, wrong = [], []
    for rel, size in files.items():
        path = os.path.join(tag_dir, rel)
        if not os.path.exists(path):
            missing.append(rel)
        elif os.path.getsize(path) != size:
            wrong.append(f"{rel} ({os.path.getsize(path)} bytes, {size} when saved)")
    if missing or wrong:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"truncated or changed: {', '.join(wrong)}"] if wrong else [])
        raise CheckpointError(f"{tag_dir}: checkpoint is not intact ({'; '.join(parts)}); use an older "
                              "complete tag or restore these files")
    return files


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tag dirs, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir)
            if TAG_RE.match(t) and os.path.exists(os.path.join(ckpt_dir, t, COMPLETE))]
    return [os.path.join(ckpt_dir, t) for t in sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))]


def find_checkpoint(path: str) -> str | None:
    """A run dir, its checkpoints/ dir or one tag dir -> the newest complete tag dir (None: nothing yet)."""
    if os.path.exists(os.path.join(path, COMPLETE)):
        return path
    for d in (os.path.join(path, CKPT_SUBDIR), path):
        tags = complete_tags(d)
        if tags:
            return tags[-1]
    return None


def find_verified(path: str) -> str:
    """find_checkpoint + verify; raises CheckpointError when there is none or it is not intact."""
    tag_dir = find_checkpoint(path)
    if tag_dir is None:
        raise CheckpointError(f"{path}: no complete checkpoint (a run dir, or a checkpoints/step_* dir with "
                              f"{COMPLETE})")
    verify(tag_dir)
    return tag_dir


def read_meta(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, "meta.json")) as f:
        return json.load(f)


def check_resume_arg(resume: str | None, out: str) -> None:
    """`--resume` before any process starts: "auto" (the newest complete checkpoint of `out`, if any) or a
    path holding a complete checkpoint; anything else raises CheckpointError naming the argument."""
    if resume is None or resume == "auto":
        return
    if not os.path.exists(resume):
        hint = " (did you mean 'auto'?)" if resume.lower() == "auto" else ""
        raise CheckpointError(f"--resume {resume}: neither 'auto' nor an existing path{hint}; give "
                              "'auto' (the newest complete checkpoint in --out) or a run dir / step_* dir")
    if find_checkpoint(resume) is None:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint there (a run dir or a checkpoints/"
                              f"step_* dir with {COMPLETE})")
