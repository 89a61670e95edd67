"""slurm/prep_array.sbatch on the local single-node SLURM: a 2-task array, then the merged shard list.

Run: .venv/bin/pytest tests/test_data_slurm.py   (starts scripts/local_slurm.sh when SLURM_CONF is unset;
skipped with the reason when SLURM cannot start)
"""

import json
import os

import pytest

from data_prep import shards as sh
from data_prep.fixtures import corpus_with_tokenizer
from tests.test_slurm_local import sbatch, slurm, wait_jobs  # noqa: F401  (slurm is a fixture)

pytestmark = pytest.mark.slurm


def test_prep_array_merges_slices(slurm, tmp_path):  # noqa: F811
    manifest, tok = corpus_with_tokenizer(str(tmp_path / "corpus"), speech=3, music=3, seconds=0.3,
                                          vocab_size=48)
    out = str(tmp_path / "prep")
    log = str(tmp_path / "prep-%a.out")
    env = (f"ALL,NUM_SLICES=2,MANIFEST={manifest},OUT={out},TOKENIZER={tok},CODEC=random,SHARD_SIZE=2,"
           "WORKERS=0")
    job = sbatch(["--array=0-1", "--cpus-per-task=1", f"--output={log}", f"--export={env}",
                  "slurm/prep_array.sbatch"])
    logs = [log.replace("%a", str(i)) for i in range(2)]
    infos = wait_jobs([f"{job}_0", f"{job}_1"], timeout=240, logs=logs)
    assert all(i["JobState"] == "COMPLETED" for i in infos.values()), infos
    listing = sh.load_list(os.path.join(out, sh.LIST_NAME))
    assert [e["index"] for e in listing["shards"]] == [0, 1, 2]
    assert all(sh.verify_entry(out, e) is None for e in listing["shards"])
    with open(os.path.join(out, sh.REPORT_NAME)) as f:
        report = json.load(f)
    assert report["seen"] == report["accepted"] == 6
