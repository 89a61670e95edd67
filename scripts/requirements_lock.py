"""Print the exact versions (name==version, sorted) of this project's runtime + test closure as installed in
the running Python: what the test suite ran with. Used by scripts/gpu_wheels.sh for requirements.lock.

    python scripts/requirements_lock.py > requirements.lock
    python scripts/requirements_lock.py --beside-torch   # names a venv with only torch still needs

--beside-torch: the runtime closure minus torch and everything torch itself installs, minus torchaudio
(it must match the node's torch release; encodec runs without it, data_prep.codec) and the test extra's ruff.
"""

from __future__ import annotations

import configparser
import importlib.metadata as metadata
import os
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def top_level_requirements(setup_cfg: str) -> list[str]:
    """install_requires plus the test extra of setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    options = cfg["options"]["install_requires"], cfg["options.extras_require"]["test"]
    lines = [line for text in options for line in text.splitlines()]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def closure(requirements: list[str]) -> dict[str, str]:
    """{distribution name: installed version} of the requirements and everything they need (no extras)."""
    env = {**default_environment(), "extra": ""}
    found, todo = {}, [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"requirements_lock: {req.name} (needed: {req}) is not installed in {sys.executable}; "
                     "run this from the environment the tests ran in")
        name = dist.metadata["Name"]
        if name.lower() in {n.lower() for n in found}:
            continue
        found[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def main() -> None:
    pins = closure(top_level_requirements(os.path.join(ROOT, "setup.cfg")))
    if sys.argv[1:] == ["--beside-torch"]:
        with_torch = {n.lower() for n in closure(["torch"])} | {"torchaudio", "ruff"}
        print(" ".join(sorted(n for n in pins if n.lower() not in with_torch)))
        return
    print(f"# unimoe-audio runtime + test closure, Python {sys.version.split()[0]}")
    for name in sorted(pins, key=str.lower):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
