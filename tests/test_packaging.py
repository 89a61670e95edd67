"""A non-editable install carries the stage configs and ds_configs/, and the config lookup finds them there.

The wheel is built with `pip wheel --no-deps .`; a pure-Python wheel installs by unpacking it, so the
lookup is checked in a fresh interpreter whose `training` package is the unpacked wheel (not the checkout),
started from a directory that holds no configs.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache"))
    try:  # the venv's own setuptools when it has one (no download); else pip's isolated build
        import setuptools  # noqa: F401
        import wheel as _wheel  # noqa: F401
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is absent from the `packages` configuration" not in proc.stdout + proc.stderr
    (path,) = glob.glob(str(out / "*.whl"))
    return path


def test_wheel_holds_stage_configs_and_ds_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in ("stage1_speech", "stage1_music", "stage2", "stage3", "curriculum"):
        assert f"training/configs/{stage}.yaml" in names
        assert f"training/configs/tiny/{stage}.yaml" in names
    assert "training/configs/tiny/joint.yaml" in names
    for ds in sorted(os.listdir(os.path.join(ROOT, "ds_configs"))):
        if ds.endswith(".json"):
            assert f"ds_configs/{ds}" in names
    for room in ("model", "checkpoint", "cluster", "eval", "demo"):
        assert f"training/{room}/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_config_lookup_finds_the_installed_files(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import os, training.config as c\n"
        "assert os.path.dirname(c.__file__).startswith(os.environ['SITE']), c.__file__\n"
        "for name in ('tiny/joint.yaml', 'training/configs/tiny/joint.yaml', 'stage3.yaml'):\n"
        "    cfg = c.load_config(name)\n"
        "    p = cfg.parallel.ds_config_path()\n"
        "    assert p.startswith(os.environ['SITE']) and os.path.isfile(p), p\n"
        "cfg = c.load_config('tiny/joint.yaml')\n"
        "cfg.validate(world_size=2)\n"
        "print('ok', cfg.name, cfg.parallel.ds_config_path())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "SITE": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok tiny_joint")
