"""The unimoe command table: every handler it names exists, and help works; the CLI's environment defaults;
the --max-steps cap."""

import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from training.cli import COMMANDS, find_command, main
from training.train import cap_max_steps


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert " ".join(cmd.path) in out


def test_unknown_command_fails():
    assert main(["no-such-command"]) == 2


def test_longest_path_wins():
    assert find_command(["data", "prep", "--out", "x"]).path == ("data", "prep")
    assert find_command(["data"]) is None


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c.path))
def test_handler_exists(cmd):
    module_name, func_name = cmd.handler.split(":")
    assert callable(getattr(importlib.import_module(module_name), func_name))


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "training.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "unimoe" in out.stdout


def test_torch_extensions_dir_is_one_per_user_cache_and_a_user_value_wins(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["--help"]) == 0
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / ".cache" / "torch_extensions")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)  # not the checkout: the same answer
    assert main(["--help"]) == 0
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "xdg" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert main(["--help"]) == 0
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_max_steps_above_the_config_is_capped_with_one_line(capsys):
    cfg = SimpleNamespace(max_steps=6)
    assert cap_max_steps(None, cfg, say=True) is None and cap_max_steps(4, cfg, say=True) == 4
    assert capsys.readouterr().out == ""
    assert cap_max_steps(12, cfg, say=False) == 6 and capsys.readouterr().out == ""  # ranks other than 0
    assert cap_max_steps(12, cfg, say=True) == 6
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "capped at the config's max_steps=6" in lines[0] and "max_steps=12" in lines[0]
