"""The demo corpus, built once and cached: synth -> tokenizer -> prep (random codec) -> mixes.

    paths = ensure_demo_data()     # dict of paths, see DEMO_KEYS
    MixtureReader(paths["train_balanced"])

Cache: `cache_dir`, else $UNIMOE_CACHE/demo, else ~/.cache/unimoe-audio/demo, with a version subfolder.
A completion marker (DONE.json) is written last; concurrent callers (ranks, test workers) serialise on a
file lock, so the corpus is built once and everyone else waits and reuses it.
The codec is the UNTRAINED random EnCodec (seed 0): the pipeline is real, the audio tokens carry no learned
structure (see data_prep.codec).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time

from data_prep.fixtures import write_corpus
from data_prep.mix import build_mix
from data_prep.prep import PrepConfig, prep
from data_prep.shards import write_json_atomic
from data_prep.synth import synth
from data_prep.text import train_tokenizer

DEMO_VERSION = "v2"  # v2: the deterministic random codec (random_init 2); v1 caches are not read
FIXTURE_DAC_VERSION = "fixtures-dac-v1"  # the fixture clips with dac_16khz_random (ensure_fixture_dac_data)
FIXTURE_ITEMS, FIXTURE_SECONDS, FIXTURE_VALID, FIXTURE_VOCAB_SIZE = (8, 8), 1.0, 2, 64  # per task: 6 train
SPEECH_ITEMS, MUSIC_ITEMS, VALID_FRACTION = 56, 56, 1 / 7  # 48 train + 8 valid per task
VOCAB_SIZE = 512
SEED_SET_ITEMS = 16  # per task, for curriculum stage 2
UNBALANCED_RATIO = {"speech": 4.0, "music": 1.0}  # the naive joint baseline
# key -> (split, ratio or None for a single-task mix, max items per task)
MIXES = {
    "train_balanced": ("train", {"speech": 1.0, "music": 1.0}, None),
    "train_unbalanced": ("train", UNBALANCED_RATIO, None),
    "seed_balanced": ("train", {"speech": 1.0, "music": 1.0}, SEED_SET_ITEMS),
    "train_speech": ("train", None, None),
    "train_music": ("train", None, None),
    "valid": ("valid", {"speech": 1.0, "music": 1.0}, None),
    "valid_speech": ("valid", None, None),
    "valid_music": ("valid", None, None),
}
DEMO_KEYS = ("root", "manifest", "tokenizer", "prep", *MIXES)


def default_cache_dir() -> str:
    base = os.environ.get("UNIMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unimoe-audio")
    return os.path.join(base, "demo")


def _paths(root: str) -> dict:
    out = {
        "root": root,
        "manifest": os.path.join(root, "synth", "manifest.jsonl"),
        "tokenizer": os.path.join(root, "spm.model"),
        "prep": os.path.join(root, "prep"),
    }
    out.update({k: os.path.join(root, "mixes", f"{k}.json") for k in MIXES})
    return out


def _build(root: str, log, size: tuple[int, int]) -> dict:
    paths = _paths(root)
    t0 = time.time()
    manifest = synth(
        os.path.join(root, "synth"),
        size[0],
        size[1],
        seed=0,
        valid_fraction=VALID_FRACTION,
        progress=False,
    )
    _train_tokenizer(manifest, paths["tokenizer"], VOCAB_SIZE)
    return _prep_and_mix(paths, manifest, "random", log, t0)


def _build_fixture_dac(root: str, log) -> dict:
    paths = _paths(root)
    t0 = time.time()
    manifest = write_corpus(os.path.join(root, "synth"), *FIXTURE_ITEMS, seconds=FIXTURE_SECONDS, seed=0,
                            valid=FIXTURE_VALID)
    _train_tokenizer(manifest, paths["tokenizer"], FIXTURE_VOCAB_SIZE)
    return _prep_and_mix(paths, manifest, "dac_16khz_random", log, t0)


def _train_tokenizer(manifest: str, out: str, vocab_size: int) -> None:
    with open(manifest, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    train_tokenizer(texts, out, vocab_size, log=lambda m: None)


def _prep_and_mix(paths: dict, manifest: str, codec: str, log, t0: float) -> dict:
    """prep the manifest with `codec` (seed 0) into paths["prep"], then every mixture of MIXES."""
    t1 = time.time()
    report = prep(
        PrepConfig(
            manifest=manifest,
            out=paths["prep"],
            tokenizer=paths["tokenizer"],
            codec=codec,
            workers=1,
            shard_size=64,
            progress=False,
        ),
        log=lambda m: None,
    )
    if report["rejected"]:
        raise RuntimeError(f"demo corpus: {len(report['rejected'])} items rejected: {report['rejected'][:3]}")
    t2 = time.time()
    for key, (split, ratio, max_items) in MIXES.items():
        tasks = ["speech", "music"] if ratio else [key.split("_")[1]]
        build_mix(
            [(t, paths["prep"]) for t in tasks],
            paths[key],
            ratio=ratio or {tasks[0]: 1.0},
            seed=0,
            split=split,
            max_items=max_items,
        )
    timing = {
        "synth_tokenizer_s": round(t1 - t0, 2),
        "prep_s": round(t2 - t1, 2),
        "mix_s": round(time.time() - t2, 2),
        "total_s": round(time.time() - t0, 2),
    }
    log(
        f"[demo-data] built in {timing['total_s']} s ({report['accepted']} clips, "
        f"{report['audio_seconds']:.0f} s of audio, untrained {codec} codec) at {paths['root']}"
    )
    return {"paths": paths, "timing": timing, "version": os.path.basename(paths["root"])}


def ensure_demo_data(cache_dir: str | None = None, log=None, size: tuple[int, int] | None = None) -> dict:
    """Build the demo corpus unless a complete one is cached; returns the dict of paths (DEMO_KEYS).
    `size` = (speech, music) clips overrides the default corpus size (tests), in its own cache folder."""
    version = DEMO_VERSION if size is None else f"{DEMO_VERSION}-{size[0]}x{size[1]}"
    return _cached(version, cache_dir, log, "the demo corpus", lambda root, log: _build(
        root, log, size or (SPEECH_ITEMS, MUSIC_ITEMS)))


def ensure_fixture_dac_data(cache_dir: str | None = None, log=None) -> dict:
    """The fixture clips (data_prep.fixtures: numpy tones and rendered music, no espeak-ng) tokenized with
    the random DAC 16 kHz codec (12 codebooks at 50 Hz), with the demo's mixtures; cached like the demo."""
    return _cached(FIXTURE_DAC_VERSION, cache_dir, log, "the DAC fixture corpus", _build_fixture_dac)


BUILTIN = {"demo": ensure_demo_data, "fixtures_dac": ensure_fixture_dac_data}  # data.builtin -> builder


def _cached(version: str, cache_dir: str | None, log, what: str, build) -> dict:
    """Run build(root, log) once per cache folder (DONE.json last, a file lock against concurrent callers)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    root = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), version)
    marker = os.path.join(root, "DONE.json")
    if os.path.isfile(marker):
        return _paths(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            if not os.path.isfile(marker):
                log(f"[demo-data] building {what} once (about a minute) in {root}")
                write_json_atomic(marker + ".building", {"pid": os.getpid()})
                done = build(root, log)
                write_json_atomic(marker, done)
                os.remove(marker + ".building")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _paths(root)


if __name__ == "__main__":
    print(json.dumps(ensure_demo_data(sys.argv[1] if len(sys.argv) > 1 else None), indent=1))
