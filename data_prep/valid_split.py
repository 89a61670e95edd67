"""A deterministic validation split for sources that have none (`unimoe data import --valid-fraction F`).

Per task, items are grouped by speaker when the task has at least two speakers (no speaker straddles the
split), else each item is its own group (a one-speaker corpus such as LJSpeech). A group goes to "valid"
when a hash of (task, group key) falls below F: the decision of one group never depends on the others, so
re-running the import, or adding items, leaves every earlier item where it was. Two corrections depend on
the whole set and are the only places a rerun can move an item: a task whose hashes put no group below F
still gets the group with the smallest hash (when it has >= 2 groups), and at most `max_items` items per
task are held out (the groups with the smallest hashes first; the first one is always kept whole), and
at least one group stays in training.

A task that already has "valid" items (LibriTTS dev-*, a jsonl `split` field) is left as it is; only items
whose split is missing or "train" are candidates ("test" stays "test").
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

DEFAULT_VALID_FRACTION = 0.01
DEFAULT_VALID_MAX_ITEMS = 300  # per task


def unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) for the given strings (sha256, not Python's salted hash())."""
    digest = hashlib.sha256("\t".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _groups(items: list[dict]) -> tuple[dict[str, list[dict]], str]:
    """{group key: items} and what the key is ("speaker" or "id")."""
    speakers = {it.get("speaker") for it in items}
    by = "speaker" if None not in speakers and len(speakers) >= 2 else "id"
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[str(it[by])].append(it)
    return groups, by


def _held_out(task: str, groups: dict[str, list[dict]], fraction: float, max_items: int) -> list[str]:
    """The group keys that go to "valid", smallest hash first."""
    ranked = sorted(groups, key=lambda g: (unit_hash(task, g), g))
    chosen = [g for g in ranked if unit_hash(task, g) < fraction]
    if not chosen and len(ranked) >= 2 and fraction > 0:
        chosen = ranked[:1]
    chosen = chosen[: len(ranked) - 1]  # training keeps at least one group
    kept, n = [], 0
    for g in chosen:
        if kept and n + len(groups[g]) > max_items:
            break
        kept.append(g)
        n += len(groups[g])
    return kept


def assign_valid_split(entries: list[dict], fraction: float = DEFAULT_VALID_FRACTION,
                       max_items: int = DEFAULT_VALID_MAX_ITEMS) -> list[str]:
    """Set entry["split"] on every entry (in place): "valid" for the held-out groups, else its own split or
    "train". Returns one line per task saying what was done."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {fraction}")
    if max_items < 1:
        raise ValueError(f"--valid-max-items must be >= 1, got {max_items}")
    by_task: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        e["split"] = e.get("split") or "train"
        by_task[e["task"]].append(e)
    notes = []
    for task in sorted(by_task):
        items = by_task[task]
        existing = sum(e["split"] == "valid" for e in items)
        if existing:
            notes.append(f"{task}: kept the source's validation split ({existing} of {len(items)} items)")
            continue
        candidates = [e for e in items if e["split"] == "train"]
        groups, by = _groups(candidates)
        chosen = _held_out(task, groups, fraction, max_items)
        for g in chosen:
            for e in groups[g]:
                e["split"] = "valid"
        n = sum(len(groups[g]) for g in chosen)
        what = f" ({len(chosen)} of {len(groups)} speakers)" if by == "speaker" else ""
        notes.append(f"{task}: held out {n} of {len(items)} items as 'valid'{what}, by a hash of the {by}")
    return notes
