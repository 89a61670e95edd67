"""Procedural music for the demo corpus: melodies over chord progressions, rendered in numpy.

Each piece draws an instrument (additive-synthesis timbre + ADSR envelope), tempo, key, mode and mood;
the caption is derived from exactly those parameters, so a text-to-music model has something learnable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
PROGRESSIONS = {
    "major": [[0, 4, 5, 3], [0, 3, 4, 0], [0, 5, 3, 4]],
    "minor": [[0, 5, 2, 6], [0, 3, 4, 0], [0, 6, 5, 4]],
}
# instrument: (harmonic amplitudes, attack s, decay s, sustain level, release s, vibrato depth)
INSTRUMENTS = {
    "piano": ([1.0, 0.5, 0.3, 0.15, 0.1, 0.05], 0.005, 0.3, 0.25, 0.1, 0.0),
    "organ": ([1.0, 0.8, 0.0, 0.5, 0.0, 0.3, 0.0, 0.2], 0.02, 0.05, 0.9, 0.05, 0.0),
    "flute": ([1.0, 0.15, 0.05], 0.06, 0.1, 0.8, 0.08, 0.006),
    "strings": ([1.0, 0.6, 0.45, 0.3, 0.25, 0.2, 0.15], 0.15, 0.2, 0.85, 0.2, 0.004),
    "bells": ([1.0, 0.0, 0.6, 0.0, 0.0, 0.4, 0.0, 0.0, 0.2], 0.002, 0.8, 0.0, 0.3, 0.0),
    "synth pad": ([1.0, 0.5, 0.33, 0.25, 0.2, 0.17, 0.14], 0.3, 0.3, 0.7, 0.3, 0.003),
}
MOODS = {
    ("major", "slow"): ["calm", "peaceful", "gentle"],
    ("major", "moderate"): ["warm", "cheerful", "bright"],
    ("major", "fast"): ["happy", "upbeat", "playful"],
    ("minor", "slow"): ["sad", "melancholic", "dark"],
    ("minor", "moderate"): ["wistful", "mysterious", "pensive"],
    ("minor", "fast"): ["tense", "dramatic", "restless"],
}


@dataclass
class Piece:
    instrument: str
    tempo: int  # beats per minute
    key: int  # 0 = C
    mode: str
    mood: str
    drums: bool
    seconds: float

    @property
    def pace(self) -> str:
        return "slow" if self.tempo < 85 else ("moderate" if self.tempo < 125 else "fast")

    def caption(self, rng: np.random.Generator) -> str:
        key = f"{NOTE_NAMES[self.key]} {self.mode}"
        beat = " over a soft drum beat" if self.drums else ""
        forms = [
            f"a {self.pace}, {self.mood} {self.instrument} melody in {key}{beat}, {self.tempo} bpm",
            f"{self.mood} {self.instrument} music in {key} at a {self.pace} tempo ({self.tempo} bpm){beat}",
            f"a {self.mood} {self.pace} tune played on {self.instrument} in {key}{beat}",
        ]
        return forms[int(rng.integers(len(forms)))]


def random_piece(rng: np.random.Generator, min_seconds: float = 1.5, max_seconds: float = 4.0) -> Piece:
    mode = str(rng.choice(list(SCALES)))
    tempo = int(rng.integers(60, 170))
    pace = "slow" if tempo < 85 else ("moderate" if tempo < 125 else "fast")
    return Piece(
        instrument=str(rng.choice(list(INSTRUMENTS))),
        tempo=tempo,
        key=int(rng.integers(12)),
        mode=mode,
        mood=str(rng.choice(MOODS[(mode, pace)])),
        drums=bool(rng.random() < 0.4),
        seconds=float(rng.uniform(min_seconds, max_seconds)),
    )


def _tone(freq: float, dur: float, sr: int, instrument: str, velocity: float) -> np.ndarray:
    harmonics, attack, decay, sustain, release, vibrato = INSTRUMENTS[instrument]
    t = np.arange(int((dur + release) * sr)) / sr
    # frequency f * (1 + vibrato * sin(2 pi 5.5 t)) integrated into a phase
    phase = 2 * np.pi * freq * t - freq * vibrato / 5.5 * np.cos(2 * np.pi * 5.5 * t)
    wave = sum(
        a * np.sin((h + 1) * phase) for h, a in enumerate(harmonics) if a and (h + 1) * freq < sr / 2.2
    )
    if sustain > 0:  # ADSR
        env = np.interp(
            t,
            [0, attack, attack + decay, max(dur, attack + decay), dur + release],
            [0, 1, sustain, sustain, 0],
        )
    else:  # percussive: linear attack, exponential ring-out
        env = np.minimum(t / attack, 1.0) * np.exp(-3 * t / decay)
    return velocity * wave * env / sum(harmonics)


def render(piece: Piece, rng: np.random.Generator, sr: int = 22050) -> np.ndarray:
    """Melody + chords (+ optional drums) as float32 mono in [-1, 1]."""
    n = int(piece.seconds * sr)
    out = np.zeros(n + sr, dtype=np.float64)
    beat = 60.0 / piece.tempo
    scale = SCALES[piece.mode]
    prog = PROGRESSIONS[piece.mode][int(rng.integers(len(PROGRESSIONS[piece.mode])))]

    def midi_to_hz(m):
        return 440.0 * 2 ** ((m - 69) / 12)

    def degree_to_midi(deg, octave):
        return 12 * octave + piece.key + scale[deg % 7] + 12 * (deg // 7)

    # chords: one per bar of 4 beats (half a bar when fast), root position triads, low octave
    bar = 4 * beat if piece.tempo < 125 else 2 * beat
    t, i = 0.0, 0
    while t < piece.seconds:
        root = prog[i % len(prog)]
        for d in (root, root + 2, root + 4):
            tone = _tone(midi_to_hz(degree_to_midi(d, 4)), bar * 0.95, sr, piece.instrument, 0.18)
            s = int(t * sr)
            out[s : s + len(tone)] += tone[: len(out) - s]
        t, i = t + bar, i + 1
    # melody: a random walk on the scale, rhythm from quarter/eighth notes, chord tones on strong beats
    t, deg = 0.0, int(rng.integers(0, 5))
    while t < piece.seconds:
        dur = beat * float(rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]))
        chord_root = prog[int(t // bar) % len(prog)]
        if abs(t / beat - round(t / beat)) < 1e-6 and rng.random() < 0.5:
            deg = chord_root + int(rng.choice([0, 2, 4])) + 7 * (deg // 7)
        else:
            deg += int(rng.choice([-2, -1, -1, 1, 1, 2]))
        deg = int(np.clip(deg, 0, 11))
        tone = _tone(midi_to_hz(degree_to_midi(deg, 5)), dur * 0.9, sr, piece.instrument, 0.5)
        s = int(t * sr)
        out[s : s + len(tone)] += tone[: len(out) - s]
        t += dur
    if piece.drums:  # kick on every beat, noise hat on off-beats
        for b in np.arange(0, piece.seconds, beat / 2):
            s = int(b * sr)
            kn = int(0.12 * sr)
            tt = np.arange(kn) / sr
            if round(b / beat * 2) % 2 == 0:
                hit = 0.6 * np.sin(2 * np.pi * (50 + 80 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 25)
            else:
                hit = 0.12 * rng.standard_normal(kn) * np.exp(-tt * 60)
            out[s : s + kn] += hit[: len(out) - s]
    out = out[:n]
    fade = min(n // 4, int(0.02 * sr))
    out[:fade] *= np.linspace(0, 1, fade)
    out[n - fade :] *= np.linspace(1, 0, fade)
    return (0.9 * out / max(1e-6, np.abs(out).max())).astype(np.float32)
