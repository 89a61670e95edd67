"""`unimoe bench prep` in a tiny mode: the JSON keys (never a timing assertion).

Run: .venv/bin/pytest tests/test_data_bench.py
"""

import json

import pytest

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
