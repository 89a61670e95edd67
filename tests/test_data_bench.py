"""`unimoe bench prep` and `unimoe bench reader` in a tiny mode: the JSON keys and the bounds that are counts,
not times (never a timing assertion).

Run: .venv/bin/pytest tests/test_data_bench.py
"""

import json

import numpy as np
import pytest

from data_prep.fixtures import write_indexed
from data_prep.shards import ShardWriter
from training.cli import main as cli

KEYS = {
    "codec_only_audio_s_per_s",
    "pipeline_audio_s_per_s",
    "pipeline_over_codec",
    "audio_seconds",
    "workers",
    "codec_only_s",
    "pipeline_s",
    "pipeline_stage_s",
    "device",
}


def test_bench_prep_cli_last_line_is_json(capsys):
    argv = ["bench", "prep", "--json", "--quick", "--seconds", "3", "--mixed-seconds", "5", "--workers", "1"]
    assert cli(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert KEYS <= set(result)
    assert result["audio_seconds"] == 6.0 and result["pipeline_over_codec"] > 0
    assert set(result["pipeline_stage_s"]) == {"decode_wait_s", "codec_s", "write_s"}
    mixed = result["mixed"]  # the mixed-length set: clips of 1-60 s (here scaled down to 5 s in all)
    assert KEYS - {"workers", "device"} <= set(mixed) and mixed["items"] == 2
    assert mixed["audio_seconds"] == pytest.approx(5.0, abs=0.01)
    assert result["mixed_pipeline_over_codec"] == mixed["pipeline_over_codec"] > 0


READER_KEYS = {"index_bytes_per_item", "open_files_max", "open_files_bound", "random_samples_per_s",
               "fixed_padding_fraction", "token_budget_padding_fraction", "maps_max", "baseline_maps"}


def test_bench_reader_cli_last_line_is_json(capsys):
    argv = ["bench", "reader", "--json", "--items", "3000", "--shards", "50", "--max-open-shards", "8",
            "--reads", "1500"]
    assert cli(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert READER_KEYS <= set(result) and result["items"] == 3000 and result["shards"] == 50
    assert result["index_item_bytes"] <= result["index_bytes_per_item"] <= 16  # + the shard table's share
    # the CLI's process starts with ~6 descriptors; this one holds what earlier tests left open
    assert result["open_files_max"] - result["baseline_open_files"] <= 8 + 2
    assert result["open_files_bound"] == 8 + 16
    assert result["open_shards_at_end"] == 8 and result["random_samples_per_s"] > 0
    assert result["maps_max"] <= result["baseline_maps"] + 4  # no memory map per shard
    assert 0 <= result["token_budget_padding_fraction"] < result["fixed_padding_fraction"] < 1


def test_synthetic_shards_are_byte_identical_to_prep_shards(tmp_path):
    """The bench writes its shards with numpy; they must be what ShardWriter (megatron-core) writes."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(str(tmp_path), 0)
    items = [(rng.integers(0, 1024, size=(8, f)), rng.integers(5, 64, size=t))
             for f, t in zip(rng.integers(4, 33, 7), rng.integers(4, 40, 7))]
    for codes, text in items:
        writer.add({"id": "x", "task": "speech", "split": "train", "seconds": 1.0}, codes, text)
    writer.finalize()
    codes = np.concatenate([c.reshape(-1) for c, _ in items]).astype(np.uint16)
    write_indexed(str(tmp_path / "fast.codes"), codes, np.array([c.size for c, _ in items]))
    write_indexed(str(tmp_path / "fast.text"), np.concatenate([t for _, t in items]).astype(np.int32),
                  np.array([len(t) for _, t in items]))
    for suffix in (".codes.bin", ".codes.idx", ".text.bin", ".text.idx"):
        assert (tmp_path / f"shard_00000{suffix}").read_bytes() == (tmp_path / f"fast{suffix}").read_bytes()
