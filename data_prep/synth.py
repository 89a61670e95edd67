"""`unimoe data synth`: the built-in demo corpus, made on this machine.

Speech: espeak-ng renders sentences generated from word lists (several voices, speaking rates and pitches),
the sentence is the transcript. Music: data_prep.music renders melodies over chords; the caption is derived
from the piece's parameters. Clips are short (about 1-4 s). Writes OUT/wavs/*.wav and OUT/manifest.jsonl with
a train/valid split (`--valid-fraction`, default 1/8 of each task, at least one item each).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data_prep.manifest import write_manifest
from data_prep.music import random_piece, render

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-gb+f2", "en-us+m3"]
SUBJECTS = [
    "the old sailor",
    "my neighbour",
    "a small child",
    "the teacher",
    "our captain",
    "the baker",
    "a tired student",
    "the young doctor",
    "her brother",
    "the quiet painter",
    "a friendly dog",
    "the farmer",
    "his grandmother",
    "the pilot",
    "a curious cat",
    "the musician",
]
VERBS = [
    "found",
    "painted",
    "carried",
    "forgot",
    "opened",
    "cleaned",
    "sold",
    "watched",
    "built",
    "borrowed",
    "repaired",
    "described",
    "counted",
    "ignored",
    "followed",
    "remembered",
]
OBJECTS = [
    "a green umbrella",
    "the heavy box",
    "seven apples",
    "an empty bottle",
    "the broken clock",
    "a long letter",
    "the wooden boat",
    "two red chairs",
    "the silver key",
    "a warm blanket",
    "the evening paper",
    "a yellow kite",
    "the stone bridge",
    "an old map",
]
PLACES = [
    "near the river",
    "in the kitchen",
    "at the station",
    "before sunrise",
    "after the storm",
    "on a cold morning",
    "behind the library",
    "during the party",
    "by the sea",
    "in the garden",
]
QUESTIONS = ["did you see", "who took", "why did they hide", "where is", "have you ever seen"]


def sentence(rng: np.random.Generator) -> str:
    c = lambda xs: str(xs[int(rng.integers(len(xs)))])  # noqa: E731
    form = int(rng.integers(4))
    if form == 0:
        return f"{c(SUBJECTS).capitalize()} {c(VERBS)} {c(OBJECTS)}."
    if form == 1:
        return f"{c(SUBJECTS).capitalize()} {c(VERBS)} {c(OBJECTS)} {c(PLACES)}."
    if form == 2:
        return f"{c(QUESTIONS).capitalize()} {c(OBJECTS)} {c(PLACES)}?"
    return f"{c(PLACES).capitalize()}, {c(SUBJECTS)} {c(VERBS)} {c(OBJECTS)}."


def speak(text: str, path: str, voice: str, rate: int, pitch: int) -> None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng not found: install it (apt-get install -y espeak-ng) to synthesise speech"
        )
    subprocess.run(
        [exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", path, text],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _split(n: int, valid_fraction: float) -> int:
    return 0 if n < 2 or valid_fraction <= 0 else max(1, int(round(n * valid_fraction)))


def synth(
    out: str,
    speech: int = 64,
    music: int = 64,
    seed: int = 0,
    valid_fraction: float = 0.125,
    progress: bool = True,
    sample_rate: int = 22050,
) -> str:
    """Make the corpus; returns the manifest path."""
    if speech < 0 or music < 0 or speech + music == 0:
        raise ValueError(f"need --speech/--music >= 0 and at least one item, got {speech} and {music}")
    wav_dir = os.path.join(out, "wavs")
    os.makedirs(wav_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, jobs = [], []
    n_valid = _split(speech, valid_fraction)
    for i in range(speech):
        item_id = f"speech_{i:05d}"
        text = sentence(rng)
        voice = VOICES[int(rng.integers(len(VOICES)))]
        rate, pitch = int(rng.integers(140, 200)), int(rng.integers(30, 70))
        jobs.append((text, os.path.join(wav_dir, item_id + ".wav"), voice, rate, pitch))
        entries.append(
            {
                "id": item_id,
                "task": "speech",
                "audio": f"wavs/{item_id}.wav",
                "text": text,
                "speaker": voice,
                "split": "valid" if i >= speech - n_valid else "train",
            }
        )
    bar = tqdm(total=speech + music, desc="synth", unit="clip", disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=2) as ex:  # espeak-ng runs as subprocesses
        for _ in ex.map(lambda j: speak(*j), jobs):
            bar.update(1)
    n_valid = _split(music, valid_fraction)
    for i in range(music):
        item_id = f"music_{i:05d}"
        piece = random_piece(rng)
        wav = render(piece, rng, sample_rate)
        sf.write(os.path.join(wav_dir, item_id + ".wav"), wav, sample_rate, subtype="PCM_16")
        entries.append(
            {
                "id": item_id,
                "task": "music",
                "audio": f"wavs/{item_id}.wav",
                "text": piece.caption(rng),
                "duration": round(len(wav) / sample_rate, 3),
                "split": "valid" if i >= music - n_valid else "train",
            }
        )
        bar.update(1)
    bar.close()
    for e in entries:
        if e["task"] == "speech":
            e["duration"] = round(sf.info(os.path.join(out, e["audio"])).duration, 3)
    path = os.path.join(out, "manifest.jsonl")
    write_manifest(path, entries)
    return path


def run_cli(args) -> int:
    try:
        path = synth(
            args.out,
            args.speech,
            args.music,
            args.seed,
            valid_fraction=getattr(args, "valid_fraction", 0.125),
        )
    except (ValueError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[synth] wrote {args.speech} speech + {args.music} music clips and {path}")
    return 0
