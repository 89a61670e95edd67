"""The demo corpus: synth (espeak-ng + numpy music) -> tokenizer -> prep -> mixes, built once under a lock.

Run: .venv/bin/pytest tests/test_data_demo.py
"""

import json
import multiprocessing as mp
import os
import shutil

import pytest

from data_prep.demo import DEMO_KEYS, ensure_demo_data
from data_prep.manifest import read_manifest
from data_prep.mix import MixtureReader
from training.cli import main as cli

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
TINY = (4, 4)


def _ensure(cache, result_file=None):
    built = []
    paths = ensure_demo_data(cache, log=built.append, size=TINY)
    result = (paths, any("built in" in m for m in built))
    if result_file:
        with open(result_file, "w") as f:
            json.dump(result, f)
    return result


def test_concurrent_callers_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    files = [str(tmp_path / f"result{i}.json") for i in range(2)]
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path / "cache"), f)) for f in files]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    results = []
    for f in files:
        with open(f) as fh:
            results.append(tuple(json.load(fh)))
    assert results[0][0] == results[1][0]
    assert sum(built for _, built in results) == 1
    paths = results[0][0]
    assert set(paths) == set(DEMO_KEYS)
    with open(os.path.join(paths["root"], "DONE.json")) as f:
        assert json.load(f)["paths"] == paths
    # cached: a third call returns at once without building
    assert _ensure(str(tmp_path / "cache")) == (paths, False)
    items, rejected, _ = read_manifest(paths["manifest"])
    assert rejected == [] and {it.split for it in items} == {"train", "valid"}
    tasks = {
        k: {MixtureReader(paths[k]).task_of(i) for i in range(20)}
        for k in DEMO_KEYS
        if k.startswith(("train", "valid", "seed"))
    }
    assert tasks["train_speech"] == tasks["valid_speech"] == {"speech"}
    assert tasks["train_music"] == {"music"} and tasks["train_balanced"] == {"speech", "music"}
    unbalanced = MixtureReader(paths["train_unbalanced"])
    assert sum(unbalanced.task_of(i) == "speech" for i in range(1000)) == 800


def test_default_demo_data_is_usable():
    """The corpus other tests and `unimoe demo` use (built once per machine, ~1 minute on 2 cores)."""
    paths = ensure_demo_data()
    r = MixtureReader(paths["train_balanced"])
    sample = r[0]
    assert sample["codes"].shape[0] == 8 and len(sample["text_ids"]) > 0
    assert r.codec_info["name"] == "demo" and r.codec_info["trained"] is True  # audible after decoding
    assert os.path.isfile(r.codec_info["checkpoint"])  # the fitted file, which an exported bundle copies
    assert MixtureReader(paths["seed_balanced"]).mix["counts"] == {"speech": 16, "music": 16}
    assert MixtureReader(paths["train_speech"]).mix["counts"] == {"speech": 48}
    assert MixtureReader(paths["valid"]).mix["counts"] == {"speech": 8, "music": 8}


def test_synth_cli(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli(["data", "synth", "--out", str(out), "--speech", "3", "--music", "3", "--seed", "1"]) == 0
    items, rejected, _ = read_manifest(str(out / "manifest.jsonl"))
    assert rejected == [] and len(items) == 6
    music = [it for it in items if it.task == "music"]
    assert all(" in " in it.text and ("major" in it.text or "minor" in it.text) for it in music)
    assert all(1.0 <= it.duration <= 4.5 for it in items)
    assert len({it.speaker for it in items if it.task == "speech"}) >= 1
