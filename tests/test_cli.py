"""The unimoe command table: every handler it names exists, and help works."""

import importlib
import subprocess
import sys

import pytest

from training.cli import COMMANDS, find_command, main


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
