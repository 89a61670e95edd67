"""slurm/prep_array.sbatch without SLURM: the script run by bash with the SLURM_ARRAY_* variables that sbatch
would set, so resubmitting part of an array (--array=1, --array=3,7) is checked on every machine.
(tests/test_data_slurm.py and tests/test_slurm_local.py run it through a real local SLURM.)

Run: .venv/bin/pytest tests/test_data_array.py
"""

import json
import os
import subprocess
import sys

import pytest

from data_prep import shards as sh
from data_prep.fixtures import corpus_with_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "slurm", "prep_array.sbatch")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("array")
    manifest, tok = corpus_with_tokenizer(str(root), speech=3, music=3, seconds=0.3, vocab_size=48)
    return root, manifest, tok


def _task(task_id, array_ids, env):
    """Run the template as array task `task_id` of a submission with --array=<array_ids>."""
    slurm = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": str(task_id),
             "SLURM_ARRAY_TASK_MIN": str(min(array_ids)), "SLURM_ARRAY_TASK_MAX": str(max(array_ids)),
             "SLURM_ARRAY_TASK_COUNT": str(len(array_ids)), "SLURM_CPUS_PER_TASK": "4"}
    full = {**os.environ, "UNIMOE_ROOT": ROOT, "PYTHONPATH": ROOT,
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **slurm, **env}
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=full, timeout=300)


def test_resubmitting_part_of_the_array_redoes_exactly_those_slices(corpus, tmp_path):
    _, manifest, tok = corpus
    out = str(tmp_path / "out")
    env = {"MANIFEST": manifest, "OUT": out, "TOKENIZER": tok, "CODEC": "random", "SHARD_SIZE": "2",
           "NUM_SLICES": "2"}
    # sbatch --array=1: slice 1 of 2 (not "the whole manifest as slice 0/1")
    p = _task(1, [1], env)
    assert p.returncode == 0, p.stderr
    assert "slice 1/2" in p.stderr and "1 decode workers, 3 codec threads, cpu" in p.stderr
    assert sorted(f for f in os.listdir(out) if f.startswith("shards.")) == [sh.list_name(1, 2)]
    assert [e["index"] for e in sh.load_list(os.path.join(out, sh.list_name(1, 2)))["shards"]] == [1]
    assert "incomplete: 0/2" in p.stdout and not os.path.exists(os.path.join(out, sh.LIST_NAME))
    # then sbatch --array=0: slice 0 of 2, the last one, merges
    p = _task(0, [0], env)
    assert p.returncode == 0, p.stderr
    merged = sh.load_list(os.path.join(out, sh.LIST_NAME))
    assert [e["index"] for e in merged["shards"]] == [0, 1, 2] and merged["total_shards"] == 3
    with open(os.path.join(out, sh.REPORT_NAME)) as f:
        assert json.load(f)["accepted"] == 6


def test_num_slices_is_required_and_the_task_must_fit(corpus, tmp_path):
    _, manifest, tok = corpus
    env = {"MANIFEST": manifest, "OUT": str(tmp_path / "out"), "TOKENIZER": tok, "CODEC": "random"}
    p = _task(0, [0, 1], env)
    assert p.returncode != 0 and "set NUM_SLICES" in p.stderr
    p = _task(5, [5], {**env, "NUM_SLICES": "4"})
    assert p.returncode == 2
    assert "need 0 <= SLURM_ARRAY_TASK_ID < NUM_SLICES; got task '5', NUM_SLICES '4'" in p.stderr
    assert not os.path.exists(tmp_path / "out")
