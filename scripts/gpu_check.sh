#!/usr/bin/env bash
# The GPU check: bash scripts/gpu_check.sh [OUT_DIR]   (default runs/gpu_check; under 8 minutes)
# On a machine with one CUDA GPU, after nothing but scripts/test.sh's set-up (sourced below, a no-op when
# done): the GPU-marked tests (grouped GEMM, MoE layer and a training step in bf16 vs fp32, NCCL world
# size 1), `unimoe bench moe --device cuda --dtype bf16 --json` and `unimoe bench train --device cuda
# --json`. Every result is a JSON file in OUT_DIR (plus each step's log); summary.json says what passed.
# Exit code 0 only when every step did. CI never runs this script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
export DS_ACCELERATOR=cuda
# shellcheck disable=SC1091
source scripts/setup_env.sh
mkdir -p "$OUT"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu_check] no CUDA device visible to torch ($(python -c 'import torch; print(torch.__version__)'))" >&2
    exit 2
fi
python - "$OUT/env.json" <<'EOF'
import json, sys, torch
props = torch.cuda.get_device_properties(0)
json.dump({"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0)),
           "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device_count": torch.cuda.device_count()}, open(sys.argv[1], "w"))
EOF

declare -A RC SECONDS_TAKEN
step() {  # step NAME TIMEOUT_S CMD... : runs CMD with a time limit, output to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "[gpu_check] $name: $*" >&2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    SECONDS_TAKEN[$name]=$((SECONDS - t0))
    echo "[gpu_check] $name: exit ${RC[$name]} in ${SECONDS_TAKEN[$name]} s" >&2
}
last_json_line() {  # the benchmark's JSON (its last stdout line) -> OUT/NAME.json
    grep '^{' "$OUT/$1.log" | tail -n 1 > "$OUT/$1.json" || true
}

step pytest_gpu 240 python -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml" tests
python - "$OUT/pytest_gpu.xml" "$OUT/pytest_gpu.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = [{"name": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time", 0)),
              "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
             for c in suite.iter("testcase")]
except (OSError, ET.ParseError) as e:
    cases = [{"name": "pytest", "outcome": "error", "message": f"no junit report: {e}"}]
json.dump({"tests": cases, "passed": sum(c["outcome"] == "passed" for c in cases),
           "not_passed": [c["name"] for c in cases if c["outcome"] != "passed"]}, open(sys.argv[2], "w"), indent=1)
EOF
step bench_moe 120 python -m training.cli bench moe --device cuda --dtype bf16 --json
last_json_line bench_moe
step bench_train 120 python -m training.cli bench train --device cuda --json
last_json_line bench_train

python - "$OUT/summary.json" "${RC[pytest_gpu]}" "${RC[bench_moe]}" "${RC[bench_train]}" \
    "${SECONDS_TAKEN[pytest_gpu]}" "${SECONDS_TAKEN[bench_moe]}" "${SECONDS_TAKEN[bench_train]}" <<'EOF'
import json, sys
names = ("pytest_gpu", "bench_moe", "bench_train")
rc, secs = [int(v) for v in sys.argv[2:5]], [int(v) for v in sys.argv[5:8]]
steps = {n: {"exit_code": r, "seconds": s, "ok": r == 0} for n, r, s in zip(names, rc, secs)}
json.dump({"ok": all(v["ok"] for v in steps.values()), "steps": steps}, open(sys.argv[1], "w"), indent=1)
print(json.dumps({"ok": all(v["ok"] for v in steps.values()), "steps": steps}))
EOF
for name in pytest_gpu bench_moe bench_train; do
    [ "${RC[$name]}" = 0 ] || exit 1
done
exit 0
