"""Which checkpoints stay: the `keep_last` newest complete tags, plus every tag whose step is a multiple of
`keep_every` (milestones, kept forever; 0 = none). Leftovers of interrupted saves older than the newest
complete tag are removed; a newer incomplete tag may still be being written and stays."""

from __future__ import annotations

import os
import shutil

from training.checkpoint.manifest import COMPLETE, TAG_RE, complete_tags, tag_step


def is_milestone(step: int, keep_every: int) -> bool:
    return keep_every > 0 and step % keep_every == 0


def prune(ckpt_dir: str, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete what the policy does not keep; returns the deleted tag dirs."""
    complete = complete_tags(ckpt_dir)
    newest = tag_step(complete[-1]) if complete else -1
    doomed = [t for t in complete[:-keep_last] if not is_milestone(tag_step(t), keep_every)]
    for t in os.listdir(ckpt_dir):
        m = TAG_RE.match(t)
        if m and int(m.group(1)) < newest and not os.path.exists(os.path.join(ckpt_dir, t, COMPLETE)):
            doomed.append(os.path.join(ckpt_dir, t))
    for path in doomed:
        complete_marker = os.path.join(path, COMPLETE)
        if os.path.exists(complete_marker):
            os.remove(complete_marker)  # invisible first: a half-deleted tag is never taken for complete
        shutil.rmtree(path, ignore_errors=True)
    return doomed
