"""The demo corpus, built once and cached: synth -> tokenizer -> prep (demo codec) -> mixes.

    paths = ensure_demo_data()     # dict of paths, see DEMO_KEYS
    MixtureReader(paths["train_balanced"])
    manifest = ensure_demo_synth() # the synthesised clips alone (what the demo codec is fitted on)

Cache: `cache_dir`, else $UNIMOE_CACHE/demo, else ~/.cache/unimoe-audio/demo, with a version subfolder;
the synthesised clips in their own subfolder (synth-<version>), shared by every corpus version and the demo
codec's fit. Completion markers (DONE.json) are written last; concurrent callers (ranks, test workers)
serialise on a file lock, so each part is built once and everyone else waits and reuses it.
The codec is the demo codec (data_prep/demo_codec.py: fitted in seconds on this corpus's train split, so
the audio can be heard after decoding); `codec="random"` gives the untrained random EnCodec instead.
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

DEMO_VERSION = "v3"  # v3: the demo codec; v2: the deterministic random codec; older caches are not read
SYNTH_VERSION = "v1"  # the synthesised clips (seed 0), shared by corpus versions and the demo codec's fit
DEMO_CODEC = "demo"
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


def cache_base() -> str:
    """The project's cache: $UNIMOE_CACHE, else ~/.cache/unimoe-audio."""
    return os.environ.get("UNIMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unimoe-audio")


def default_cache_dir() -> str:
    return os.path.join(cache_base(), "demo")


def _synth_dir(cache_dir: str | None, size: tuple[int, int] | None) -> str:
    name = f"synth-{SYNTH_VERSION}" if size is None else f"synth-{SYNTH_VERSION}-{size[0]}x{size[1]}"
    return os.path.join(os.path.abspath(cache_dir or default_cache_dir()), name)


def _paths(root: str, synth_dir: str) -> dict:
    out = {
        "root": root,
        "manifest": os.path.join(synth_dir, "manifest.jsonl"),
        "tokenizer": os.path.join(root, "spm.model"),
        "prep": os.path.join(root, "prep"),
    }
    out.update({k: os.path.join(root, "mixes", f"{k}.json") for k in MIXES})
    return out


def _once(folder: str, what: str, build, log) -> None:
    """Run build() unless folder/DONE.json exists; one builder at a time (file lock), DONE.json last."""
    marker = os.path.join(folder, "DONE.json")
    if os.path.isfile(marker):
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            if not os.path.isfile(marker):
                log(f"[demo-data] building {what} once in {folder}")
                write_json_atomic(marker + ".building", {"pid": os.getpid()})
                done = build()
                write_json_atomic(marker, done)
                os.remove(marker + ".building")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_demo_synth(cache_dir: str | None = None, log=None, size: tuple[int, int] | None = None) -> str:
    """The demo corpus's synthesised clips (espeak-ng speech, rendered music, train/valid split), made once;
    returns the manifest path."""
    log = log or (lambda m: print(m, file=sys.stderr))
    folder = _synth_dir(cache_dir, size)
    speech, music = size or (SPEECH_ITEMS, MUSIC_ITEMS)

    def build():
        t0 = time.time()
        synth(folder, speech, music, seed=0, valid_fraction=VALID_FRACTION, progress=False)
        return {"synth_s": round(time.time() - t0, 2), "version": SYNTH_VERSION}

    _once(folder, f"the demo clips ({speech} speech, {music} music)", build, log)
    return os.path.join(folder, "manifest.jsonl")


def _build(root: str, log, size: tuple[int, int] | None, cache_dir: str | None, codec: str) -> dict:
    t0 = time.time()
    manifest = ensure_demo_synth(cache_dir, log, size)
    paths = _paths(root, os.path.dirname(manifest))
    _train_tokenizer(manifest, paths["tokenizer"], VOCAB_SIZE)
    return _prep_and_mix(paths, manifest, codec, log, t0)


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
        f"{report['audio_seconds']:.0f} s of audio, codec {codec}) at {paths['root']}"
    )
    return {"paths": paths, "timing": timing, "version": os.path.basename(paths["root"])}  # e.g. v3


def ensure_demo_data(cache_dir: str | None = None, log=None, size: tuple[int, int] | None = None,
                     codec: str = DEMO_CODEC) -> dict:
    """Build the demo corpus unless a complete one is cached; returns the dict of paths (DEMO_KEYS).
    `size` = (speech, music) clips overrides the default corpus size (tests), in its own cache folder;
    `codec` another codec than the demo codec ("random"), also in its own folder."""
    log = log or (lambda m: print(m, file=sys.stderr))
    version = DEMO_VERSION if size is None else f"{DEMO_VERSION}-{size[0]}x{size[1]}"
    version += "" if codec == DEMO_CODEC else f"-{codec}"
    root = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), version)
    _once(root, "the demo corpus (about a minute)", lambda: _build(root, log, size, cache_dir, codec), log)
    return _paths(root, _synth_dir(cache_dir, size))


def ensure_fixture_dac_data(cache_dir: str | None = None, log=None) -> dict:
    """The fixture clips (data_prep.fixtures: numpy tones and rendered music, no espeak-ng), 8 + 8 of 1 s,
    tokenized with the UNTRAINED random DAC 16 kHz (12 codebooks at 50 Hz), with the demo's mixtures; made
    once in the demo's cache (a config's `data.builtin: fixtures_dac`, as tiny/paper_dac.yaml)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    root = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), FIXTURE_DAC_VERSION)
    paths = _paths(root, os.path.join(root, "synth"))

    def build():
        t0 = time.time()
        manifest = write_corpus(os.path.dirname(paths["manifest"]), *FIXTURE_ITEMS, seconds=FIXTURE_SECONDS,
                                seed=0, valid=FIXTURE_VALID)
        _train_tokenizer(manifest, paths["tokenizer"], FIXTURE_VOCAB_SIZE)
        return _prep_and_mix(paths, manifest, "dac_16khz_random", log, t0)

    _once(root, "the DAC fixture corpus (about 30 s)", build, log)
    return paths


BUILTIN = {"demo": ensure_demo_data, "fixtures_dac": ensure_fixture_dac_data}  # data.builtin -> its corpus


if __name__ == "__main__":
    print(json.dumps(ensure_demo_data(sys.argv[1] if len(sys.argv) > 1 else None), indent=1))
