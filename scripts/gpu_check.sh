#!/usr/bin/env bash
# The GPU check, in one shot on an offline GPU node:
#     bash scripts/gpu_check.sh [--wheels DIR] [--reinstall] [--budget S] [OUT]
#
# Uses the python3 that already has a CUDA torch (GPU_CHECK_PYTHON to name another; it may itself be a venv,
# so nothing new is created beside it). With --wheels (a wheelhouse from scripts/gpu_wheels.sh; default
# ./wheels when it exists) the distributions that python lacks and this project are installed with
# `pip install --no-index --no-deps --target SITE` (GPU_CHECK_SITE, default $TMPDIR/unimoe-gpu-site) and
# put on PYTHONPATH (--reinstall: every wheel, also those it has); nothing here touches the network or apt.
# OUT (default runs/gpu_check): env.json first (GPU, capability, memory, driver, nvidia-smi, torch/CUDA/
# deepspeed/megatron-core versions, other processes on the GPU), then one JSON object per step (NAME.json, an
# error object when the step failed; logs in OUT/logs) and summary.json, rewritten after every step.
# No torch or no CUDA: summary.json says why and the exit code is 2, within seconds.
# One deadline for everything (--budget, default 300 s); each step gets what is left and is interrupted
# with SIGINT at the deadline (pytest still writes its junit report). Steps:
#   precision      bf16 vs fp32 (TF32 off) of the MoE layer and one training step, within stated tolerances
#   bench_moe      bench moe --device cuda --dtype bf16: fails when the CUTLASS path did not run, a token was
#                  dropped or DeepSpeed's comparison errored; overhead vs dense and vs DeepSpeed
#   pytest_gpu     pytest -m gpu (per-test --timeout; a skipped test is a failure)
#   bench_train_bf16 / bench_train_fp32   MFU and peak memory, fp32 with TF32
#   plan_memory    the planner's predicted vs measured peak memory of one step (within 25%)
#   train_fixture  `unimoe train --nproc 1` one step on the GPU, on fixture data
# Exit 0 only when every step passed. CI never runs this script. GPU_CHECK_DEVICE=cpu runs the steps on the
# CPU instead of stopping at "no CUDA" (a dry run of this machinery: tests/test_gpu_check.py);
# GPU_CHECK_STEPS="bench_moe precision" runs only those steps (a second run for what failed).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS="" BUDGET=300 OUT=""
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) WHEELS=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --reinstall) export GPU_CHECK_REINSTALL=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) OUT=$1; shift ;;
    esac
done
[ -z "$WHEELS" ] && [ -d "$ROOT/wheels" ] && WHEELS=$ROOT/wheels
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check.sh: --wheels $WHEELS is not a directory (scripts/gpu_wheels.sh)" >&2; exit 2; }
    WHEELS=$(cd "$WHEELS" && pwd)
fi
OUT=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.json "$OUT"/*.xml "$OUT/steps.jsonl" "$OUT"/logs/*.log
PY=${GPU_CHECK_PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/unimoe-gpu-site}
DEADLINE=$((SECONDS + BUDGET))
export GPU_CHECK_BUDGET=$BUDGET PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT
cd "$ROOT"
helper() { "$PY" -m benchmarks.gpu_check "$@"; }

if ! torch_version=$(timeout 120 "$PY" -c "import torch; print(torch.__version__)" 2>&1); then
    helper fail "$OUT" "no torch in $PY: ${torch_version: -300}" 2>/dev/null || \
        printf '{"ok": false, "reason": "no torch in %s"}\n' "$PY" > "$OUT/summary.json"
    echo "[gpu_check] no torch in $PY; see $OUT/summary.json" >&2
    exit 2
fi

record() {  # record NAME RC SECONDS [--junit XML]: NAME.json, steps.jsonl, summary.json
    helper step "$OUT" "$@"
}

if [ -n "$WHEELS" ]; then
    t0=$SECONDS
    helper install "$OUT" "$WHEELS" "$SITE" "$ROOT" > "$OUT/logs/install.log" 2>&1
    record install $? $((SECONDS - t0))
    export PYTHONPATH=$ROOT:$SITE PATH=$SITE/bin:$PATH
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    helper env "$OUT" || { echo "[gpu_check] no CUDA device: $OUT/summary.json" >&2; exit 2; }
    export DS_ACCELERATOR=cuda
else
    helper env "$OUT"
fi

step() {  # step NAME [--junit XML] -- CMD...: CMD under what is left of the deadline, SIGINT at the end
    local name=$1 junit=() left t0 rc
    shift
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then return; fi
    [ "$1" = --junit ] && { junit=(--junit "$2"); shift 2; }
    shift  # --
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "not started: ${left} s of the ${BUDGET} s budget left" > "$OUT/logs/$name.log"
        record "$name" 200 0 "${junit[@]}"
        return
    fi
    echo "[gpu_check] $name (${left} s left): $*" >&2
    t0=$SECONDS
    timeout -s INT -k 15 "$left" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    record "$name" "$rc" $((SECONDS - t0)) "${junit[@]}"
}
per_test() { local left=$((DEADLINE - SECONDS - 10)); echo $((left < 150 ? (left > 10 ? left : 10) : 150)); }
PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider)
TRAIN_TEST=tests/test_launch_gpu.py::test_nproc_trains_on_the_gpu

step precision -- "$PY" -m benchmarks.bench_precision --device "$DEVICE" --json
step bench_moe -- "$PY" -m training.cli bench moe --device "$DEVICE" --dtype bf16 --json
step pytest_gpu --junit "$OUT/pytest_gpu.xml" -- "${PYTEST[@]}" --timeout "$(per_test)" \
    --junitxml "$OUT/pytest_gpu.xml" --deselect "$TRAIN_TEST" tests
step bench_train_bf16 -- "$PY" -m training.cli bench train --device "$DEVICE" --precision bf16 --json
step bench_train_fp32 -- "$PY" -m training.cli bench train --device "$DEVICE" --precision fp32 --json
step plan_memory -- "$PY" -m benchmarks.gpu_check plan-memory "$OUT"
step train_fixture --junit "$OUT/train_fixture.xml" -- "${PYTEST[@]}" --timeout "$(per_test)" \
    --junitxml "$OUT/train_fixture.xml" "$TRAIN_TEST"

"$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps({'ok': s['ok'], \
'failed': s['failed'], 'seconds': {k: v['seconds'] for k, v in s['steps'].items()}}))" "$OUT/summary.json"
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUT/summary.json"
