"""Errors early and once: options and key=value overrides in any order on every command; a bad --resume
named before any process starts; config errors printed by rank 0 only; `ckpt reshard` on a missing path
suggests nothing it refuses; no third-party import notices on the CLI paths; --help shows defaults.

Run: .venv/bin/pytest tests/test_cli_errors.py
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from training.cli import COMMANDS, build_parser, find_command, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "training/configs/tiny/stage1_speech.yaml"


def _parse(argv):
    cmd = find_command(argv)
    return build_parser(cmd).parse_intermixed_args(argv[len(cmd.path):])


def test_overrides_and_options_in_any_order():
    args = _parse(["train", "--config", TINY, "--nproc", "1", "max_steps=12", "--save-every", "6",
                   "parallel.ep=1"])
    assert args.overrides == ["max_steps=12", "parallel.ep=1"] and args.save_every == 6 and args.nproc == 1
    args = _parse(["plan", "optim.lr=1e-4", "--config", TINY, "model.recompute=block", "--gpus", "8"])
    assert args.overrides == ["optim.lr=1e-4", "model.recompute=block"] and args.gpus == 8
    args = _parse(["data", "import", "--out", "m.jsonl", "SRC", "--format", "ljspeech"])
    assert args.src == "SRC" and args.format == "ljspeech"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c.path))
def test_every_command_parses_intermixed(cmd, capsys):
    """argparse refuses intermixed parsing for some parser shapes (a positional inside a mutually exclusive
    group, REMAINDER): every command's parser takes it (an empty line: parsed, or 'required' refused)."""
    try:
        build_parser(cmd).parse_intermixed_args([])
    except SystemExit as e:
        assert e.code == 2 and "required" in capsys.readouterr().err


@pytest.mark.parametrize("value,said", [("/nope", "neither 'auto' nor an existing path"),
                                        ("Auto", "did you mean 'auto'?")])
def test_bad_resume_is_named_before_any_process_starts(tmp_path, capsys, value, said):
    out = tmp_path / "run"
    code = main(["train", "--config", TINY, "--nproc", "2", "max_steps=3", "--resume", value,
                 "--out", str(out), "parallel.ep=1"])
    err = capsys.readouterr().err
    assert code == 2 and f"--resume {value}" in err and said in err
    assert not out.exists()  # no rank started (a rank makes the run dir first)


def test_resume_of_a_directory_without_a_checkpoint(tmp_path, capsys):
    assert main(["train", "--config", TINY, "--resume", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no complete checkpoint there" in capsys.readouterr().err


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_config_errors_are_printed_by_rank_0_only(monkeypatch, capsys, rank, printed):
    """Each rank is its own process with RANK set by the launcher; a config error every rank hits (the
    layout of a checkpoint, a bad override) is printed by rank 0, and every rank exits 2."""
    from training.train import run_cli

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = SimpleNamespace(config=TINY, overrides=["optim.no_such_key=1"], ds_config=None, save_every=None,
                           out=None, nproc=None, resume=None, max_steps=None)
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert ("no_such_key" in err) is printed


def test_reshard_of_a_missing_path_suggests_only_what_it_reads(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["ckpt", "reshard", "--ckpt", missing, "--ep", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "export" not in err and "safetensors" not in err


def test_cli_paths_print_no_third_party_import_notices():
    """A fresh process (a notice prints once per process) runs the CLI's entry point, then imports what
    export/generate/eval/reshard load (megatron-core's tensor-parallel layers): no TransformerEngine/Apex
    notice on stderr, while a warning of ours still shows."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = REPO
    code = ("import warnings; from training.cli import main; main(['--help']); "
            "import training.model.tensor_parallel; warnings.warn('ours still shows')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Transformer Engine" not in proc.stderr and "Apex" not in proc.stderr, proc.stderr
    assert "ours still shows" in proc.stderr


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--num NUM             (default: 1)" in out and "(default: 1.0)" in out
    with pytest.raises(SystemExit):
        main(["data", "import", "--help"])
    assert "(default: 0.01)" in capsys.readouterr().out
