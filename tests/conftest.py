import os
import sys

from training.cli import set_environment_defaults

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
set_environment_defaults()  # the CLI's TORCH_EXTENSIONS_DIR, also for the tests that run DeepSpeed in-process
# The venv's tools first (ninja, unimoe): DeepSpeed rebuilds its JIT ops whenever the ninja it finds
# changes, so a run of plain `.venv/bin/pytest` must see the same ninja as jobs started by the tests.
_venv_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _venv_bin:
    os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")
