"""`unimoe eval --audio-metrics`: score what a checkpoint generates, and the codec's ceiling.

For the first `per_task` validation items of each task, the model generates from the item's text
(transcript or caption; one batch per task, seeded), and the item's reference codes are decoded by the
codec (the reference reconstruction: the best a model of this codec can sound). Both are scored:
speech by DNSMOS and WER/CER (training/eval/audio_metrics.py; the ASR's language model is built from the
evaluated transcripts), music by caption adherence (training/eval/music_score.py), plus a floor for music:
the references scored against another item's caption. Per task: the mean of each score over the clips that
could be scored, and how many could not, by reason. The WAVs are written under OUT/audio/.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from training.eval.audio_metrics import DNSMOS_KEYS, SphinxASR, load_scorer, speech_scores
from training.eval.music_score import music_scores

SPEECH_KEYS = (*DNSMOS_KEYS, "wer", "cer")
MAX_SECONDS = 6.0


def eval_items(reader, per_task: int, tasks=None) -> list[dict]:
    """The first `per_task` distinct items of each task in mixture order: id, task, text, codes [K, T]."""
    tasks = [t for t in reader.tasks if tasks is None or t in tasks]
    items, seen, counts = [], set(), Counter()
    n_distinct = sum(reader.mix["counts"].values())
    for i in range(min(len(reader), 4 * n_distinct)):
        if all(counts[t] >= per_task for t in tasks):
            break
        task = reader.task_of(i)
        if task not in tasks or counts[task] >= per_task:
            continue
        meta = reader.meta(i)
        if meta["id"] in seen:
            continue
        seen.add(meta["id"])
        counts[task] += 1
        items.append({"id": meta["id"], "task": task, "text": meta.get("text", ""),
                      "codes": torch.as_tensor(np.asarray(reader[i]["codes"]), dtype=torch.long)})
    return items


def reference_audio(codec, items: list[dict]) -> list[np.ndarray]:
    from training.eval.generate_cli import decode_clip

    return [decode_clip(codec, it["codes"][None]) for it in items]


@torch.no_grad()
def generated_audio(model, codec, tokenizer, items: list[dict], seed: int) -> list[np.ndarray]:
    """One batch per task: each item's text, at most as long as its reference (capped at MAX_SECONDS)."""
    from training.eval.generate_cli import decode_clip, max_frames_for
    from training.model.generate import generate

    model.eval()
    out: list = [None] * len(items)
    for task in sorted({it["task"] for it in items}):
        idx = [i for i, it in enumerate(items) if it["task"] == task]
        ids = [[int(x) for x in tokenizer.encode(items[i]["text"])] for i in idx]
        seconds = min(MAX_SECONDS, max(items[i]["codes"].shape[-1] for i in idx) / codec.frame_rate)
        max_frames = max_frames_for(model, codec, seconds, max(len(x) for x in ids))
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        codes, lengths = generate(model, task, ids, max_frames=max_frames, min_frames=min(max_frames, 1),
                                  generator=gen, return_lengths=True)
        for row, i in enumerate(idx):
            n = min(int(lengths[row]), items[i]["codes"].shape[-1])
            out[i] = decode_clip(codec, codes[row:row + 1, :, :n])
    return out


def score_clips(items: list[dict], clips: list[np.ndarray], sr: int, asr=None, scorer=None) -> list[dict]:
    scores = []
    for it, wav in zip(items, clips):
        if it["task"] == "speech":
            s = speech_scores(wav, sr, it["text"], asr=asr)
        else:
            m = music_scores(wav, sr, it["text"])
            s = {"music_score": m["music_score"], "matches": m["matches"], "estimated": m["estimated"],
                 "reasons": {"music_score": m["reason"]} if m["reason"] else {}}
        if scorer is not None:
            s["extra"] = scorer(wav, sr, it["task"], it["text"])
        scores.append({"id": it["id"], "task": it["task"], "text": it["text"], **s})
    return scores


def summarize(scores: list[dict]) -> dict:
    """Per task: the mean of each score over the clips it could score, the count, nulls by reason."""
    out = {}
    for task, keys in (("speech", SPEECH_KEYS), ("music", ("music_score",))):
        rows = [s for s in scores if s["task"] == task]
        if not rows:
            continue
        summary = {"clips": len(rows)}
        for key in keys:
            vals = [s[key] for s in rows if s.get(key) is not None]
            summary[key] = float(np.mean(vals)) if vals else None
            summary[f"{key}_scored"] = len(vals)
            reasons = Counter(s["reasons"][key] for s in rows if key in s.get("reasons", {}))
            if reasons:
                summary[f"{key}_null"] = dict(reasons)
        out[task] = summary
    return out


def music_floor(items: list[dict], refs: list[np.ndarray], sr: int) -> float | None:
    """References scored against the next music item's caption: what ignoring the caption scores."""
    idx = [i for i, it in enumerate(items) if it["task"] == "music"]
    vals = [music_scores(refs[i], sr, items[idx[(k + 1) % len(idx)]]["text"])["music_score"]
            for k, i in enumerate(idx)] if len(idx) > 1 else []
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _write_wavs(out_dir: str, items: list[dict], clips: list[np.ndarray], sr: int) -> None:
    import soundfile as sf

    os.makedirs(out_dir, exist_ok=True)
    for it, wav in zip(items, clips):
        sf.write(os.path.join(out_dir, f"{it['id']}.wav"), np.clip(wav, -1, 1), sr, subtype="PCM_16")


def audio_eval(loaded, reader, out_dir: str, per_task: int = 8, seed: int = 0, references: bool = True,
               asr_model: str | None = None, scorer: str | None = None, tasks=None) -> tuple[dict, dict]:
    """Generations (and, with references=True, the codec's reconstruction of the references) scored per task.
    loaded: training.checkpoint.inference.load_everything()'s (model, meta, codec, tokenizer).
    -> (summary, per-item scores)"""
    model, _, codec, tokenizer = loaded
    items = eval_items(reader, per_task, tasks)
    speech_texts = [it["text"] for it in items if it["task"] == "speech"]
    asr = SphinxASR(speech_texts, model_dir=asr_model) if speech_texts and _has_pocketsphinx() else None
    score_fn = load_scorer(scorer) if scorer else None
    result = {"items_per_task": per_task, "seed": seed, "codec": codec.name}
    clips = {"generated": generated_audio(model, codec, tokenizer, items, seed)}
    if references:
        clips["reference"] = reference_audio(codec, items)
    per_item = {}
    for kind, audio in clips.items():
        _write_wavs(os.path.join(out_dir, "audio", kind), items, audio, codec.sample_rate)
        per_item[kind] = score_clips(items, audio, codec.sample_rate, asr, score_fn)
        result[kind] = summarize(per_item[kind])
    if references and len([it for it in items if it["task"] == "music"]) > 1:
        result["reference"]["music"]["music_score_floor"] = music_floor(items, clips["reference"],
                                                                      codec.sample_rate)
    result["wav_dir"] = os.path.join(out_dir, "audio")
    return result, per_item


def _has_pocketsphinx() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True
