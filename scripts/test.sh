#!/usr/bin/env bash
# The test command: bash scripts/test.sh [--all] [pytest args...]
# --all: also the tests marked slow (the full layout matrix, 8 ranks), which setup.cfg deselects by default;
# gpu tests stay deselected (they need a CUDA device: scripts/gpu_check.sh runs them).
# On a fresh machine it installs the Debian packages the tests need (as root), creates .venv,
# installs the package with its test extra, starts a throw-away local SLURM, then runs pytest.
# Re-running it is fast: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source scripts/setup_env.sh

if [ -x scripts/local_slurm.sh ] && command -v slurmctld >/dev/null 2>&1; then
    if SLURM_ENV=$(scripts/local_slurm.sh start --nodes 2); then  # two nodes: the multi-node tests
        eval "$SLURM_ENV"
        trap 'scripts/local_slurm.sh stop >/dev/null 2>&1 || true' EXIT
    else
        echo "[test.sh] local SLURM could not start; SLURM tests will be skipped with that reason" >&2
    fi
fi

MARKERS=()
if [ "${1:-}" = "--all" ]; then
    shift
    MARKERS=(-m "not gpu")
fi

cd "$ROOT"
# The suite runs on the CPU (gloo, DeepSpeed's CPU accelerator) also on a GPU machine; the GPU tests are
# scripts/gpu_check.sh's (pytest -m gpu)
export CUDA_VISIBLE_DEVICES=
set +e
python -m pytest "${MARKERS[@]}" "$@"
rc=$?
set -e
exit $rc
