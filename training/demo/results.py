"""The demo's results: the markdown table (OUT/results.md) and results.json.

Per model: validation loss per task, and from `eval --audio-metrics` (training/eval/audio_eval.py) the
speech DNSMOS and WER of its generations and the caption-adherence score of its music; one more row,
the codec ceiling: the validation references decoded by the codec, scored the same way. A score at its
metric's floor (what noise or a clip that ignores its text scores) is marked, not hidden.
"""

from __future__ import annotations

from training.demo.budget import StageRun

# The floors, measured: white noise and the random codec's buzz score DNSMOS 1.10-1.16; a clip without
# the words scores WER 1.0 (pocketsphinx hears nothing); music: the references scored against another
# item's caption (measured per run: music_score_floor).
DNSMOS_FLOOR, WER_FLOOR, MUSIC_FLOOR_MARGIN = 1.5, 0.9, 0.05
ROWS = (("speech", "speech"), ("music", "music"), ("stage2", None), ("stage3", None), ("joint", None))


def _audio(evals: dict, key: str, kind: str, task: str) -> dict:
    return (evals.get(key, {}).get("audio_metrics") or {}).get(kind, {}).get(task) or {}


def music_floor(evals: dict) -> float | None:
    return _audio(evals, "stage3", "reference", "music").get("music_score_floor")


def _null_reasons(summary: dict, key: str) -> str:
    """'8 too short' from {"too short (0.4 s < 1.0 s)": 5, "too short (0.2 s < 1.0 s)": 3}."""
    counts: dict = {}
    for reason, n in (summary.get(f"{key}_null") or {}).items():
        short = reason.split(" (")[0]
        counts[short] = counts.get(short, 0) + n
    return ", ".join(f"{n} {r}" for r, n in counts.items())


def _cell(value, fmt: str, at_floor: bool, summary: dict | None = None, key: str = "") -> str:
    """'0.93 (floor, 2/8 clips)': the mean over the clips that could be scored, at its floor or not."""
    summary = summary or {}
    if value is None:
        why = _null_reasons(summary, key)
        return f"n/a ({why})" if why else "n/a"
    notes = ["floor"] if at_floor else []
    scored, clips = summary.get(f"{key}_scored"), summary.get("clips")
    if scored is not None and clips and scored < clips:
        notes.append(f"{scored}/{clips} clips")
    return fmt.format(value) + (f" ({', '.join(notes)})" if notes else "")


def audio_cells(evals: dict, key: str, kind: str = "generated", own: str | None = None) -> list[str]:
    """DNSMOS, WER, music score of one model (or of the references, kind="reference")."""
    speech, music = _audio(evals, key, kind, "speech"), _audio(evals, key, kind, "music")
    floor = music_floor(evals)
    dnsmos, wer, score = speech.get("dnsmos"), speech.get("wer"), music.get("music_score")
    cells = [_cell(dnsmos, "{:.2f}", dnsmos is not None and dnsmos < DNSMOS_FLOOR, speech, "dnsmos"),
             _cell(wer, "{:.0%}", wer is not None and wer >= WER_FLOOR, speech, "wer"),
             _cell(score, "{:.2f}", None not in (score, floor) and score <= floor + MUSIC_FLOOR_MARGIN, music,
                   "music_score")]
    if own == "speech":
        cells[2] = "—"
    elif own == "music":
        cells[:2] = ["—", "—"]
    return cells


def _loss(evals: dict, key: str, task: str, own: str | None) -> str:
    if own is not None and task != own:
        return "—"
    loss = evals.get(key, {}).get("loss_per_task", {}).get(task)
    return f"{loss:.3f}" if loss is not None else "n/a"


def results_table(stages: dict[str, StageRun], evals: dict[str, dict]) -> str:
    """Markdown: validation loss per task (lower is better) and the audio scores of each model."""
    lines = ["| model | speech val loss | music val loss | DNSMOS | WER | music score | steps "
             "| train samples | peak lr | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, own in ROWS:
        st = stages[key]
        losses = f"{_loss(evals, key, 'speech', own)} | {_loss(evals, key, 'music', own)}"
        audio = " | ".join(audio_cells(evals, key, own=own))
        lines.append(f"| {st.title} | {losses} | {audio} | {st.steps} | {st.steps * st.batch} | {st.lr:g} | "
                     f"{st.wall_s:.0f} |")
    if _audio(evals, "stage3", "reference", "speech") or _audio(evals, "stage3", "reference", "music"):
        lines.append(f"| codec ceiling (validation references through the codec) | — | — | "
                     f"{' | '.join(audio_cells(evals, 'stage3', 'reference'))} | — | — | — | — |")
    curriculum = sum(stages[k].steps * stages[k].batch for k in ("speech", "music", "stage2", "stage3"))
    n_valid = evals.get("stage3", {}).get("samples", "?")
    audio = (evals.get("stage3", {}).get("audio_metrics") or {})
    floor = music_floor(evals)
    lines += ["", f"Validation loss = cross-entropy summed over the codebooks, on {n_valid} samples of the "
              f"balanced validation mixture (lower is better; a specialist only on its own task). "
              f"Training samples: curriculum {curriculum} in total, joint baseline "
              f"{stages['joint'].steps * stages['joint'].batch}."]
    if audio:
        lines.append(f"Audio scores on {audio.get('items_per_task')} validation items per task, generated "
                     f"from their transcripts/captions (seed {audio.get('seed')}): DNSMOS overall (1-5, "
                     f"higher is better), WER of pocketsphinx against the transcript (lower is better), "
                     f"music score = fraction of the caption's instrument/key/mode/tempo/drums found in the "
                     f"signal. \"(floor)\": at the metric's floor, no better than noise or than ignoring "
                     f"the text (DNSMOS < {DNSMOS_FLOOR}, WER >= {WER_FLOOR:.0%}, music score <= "
                     f"{'n/a' if floor is None else f'{floor:.2f}'} + {MUSIC_FLOOR_MARGIN}, the references "
                     f"scored against another item's caption). \"2/8 clips\": the mean over the clips that "
                     f"could be scored (the others too short, silent...); \"n/a (8 too short)\": none could.")
    for key in ("stage3", "joint"):
        routing = evals.get(key, {}).get("routing", {}).get("summary")
        if routing:
            ept, null = routing["experts_per_token"], routing["null_share"]
            lines.append(f"Routing, {stages[key].title}: experts/token speech {ept['speech']:.2f} "
                         f"music {ept['music']:.2f}; null share speech {null['speech']:.2f} "
                         f"music {null['music']:.2f}; speech/music divergence "
                         f"{routing['task_divergence']:.2f}")
    return "\n".join(lines)


def results_json(stages: dict[str, StageRun], evals: dict[str, dict]) -> dict:
    models = {}
    for key, own in ROWS:
        ev, st = evals.get(key, {}), stages[key]
        models[key] = {"title": st.title, "tasks": [own] if own else ["speech", "music"],
                       "val_loss": ev.get("loss_per_task"), "steps": st.steps,
                       "train_samples": st.steps * st.batch, "peak_lr": st.lr, "wall_s": round(st.wall_s, 1),
                       "audio": (ev.get("audio_metrics") or {}).get("generated")}
    ref = (evals.get("stage3", {}).get("audio_metrics") or {}).get("reference")
    return {"models": models, "codec_ceiling": ref, "floors": {"dnsmos": DNSMOS_FLOOR, "wer": WER_FLOOR,
                                                               "music_score": music_floor(evals)}}
