#!/usr/bin/env bash
# The wheelhouse for offline GPU nodes: bash scripts/gpu_wheels.sh [--python-version X.Y] [--full|--only a,b] DIR
# Run it where the package index is reachable, from the environment the test suite ran in (.venv when it
# exists, else the python3 on PATH). It writes into DIR, for CPython X.Y (default 3.12, the GPU machine's)
# on manylinux x86_64:
#   - the wheels of every runtime dependency that a CUDA + torch image lacks (SHIP below; deepspeed and
#     encodec are published as source only and are built here as pure-Python wheels), pinned to the
#     versions installed here;
#   - setuptools >= 64 and wheel, so that `pip install --no-index --find-links DIR .` builds this project
#     offline (or use --no-build-isolation where they are installed);
#   - requirements.lock: the exact versions of the whole runtime + test closure installed here.
# On the node: pip install --no-index --find-links DIR .   (a venv that has a CUDA torch)
#          or: pip install --no-index --no-deps --target SITE DIR/*.whl; PYTHONPATH=SITE  (scripts/gpu_check.sh)
# --full: every runtime dependency except torch, what torch installs itself and torchaudio (it must match
#   the node's torch; encodec runs without it), e.g. to run the test suite in a venv that has only torch
#   (about 70 MB for 3.12: no 60 MB budget).
# --only a,b: just those packages (the default test uses a few). Exit 1 when a wheel is missing or the
# wheels exceed 60 MB.
set -euo pipefail
PYVER=3.12
ONLY=""
FULL=""
while [ $# -gt 0 ]; do
    case $1 in
        --python-version) PYVER=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --full) FULL=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        -*) echo "gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || { echo "usage: gpu_wheels.sh [--python-version X.Y] [--full|--only a,b] DIR" >&2; exit 2; }
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
case $PYVER in
    [0-9].[0-9]|[0-9].[0-9][0-9]) ;;
    *) echo "gpu_wheels.sh: --python-version X.Y, not $PYVER" >&2; exit 2 ;;
esac
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
# What a CUDA + torch image lacks: our dependencies that are not torch's, and what they import. The GPU
# machine's image has numpy ... py-cpuinfo already (scripts/gpu_check.sh installs only the distributions its
# python lacks, so the image's own builds stay); a venv with nothing but torch needs them. packaging and
# typing-extensions are always installed: megatron-core and pydantic need newer ones than older images have.
SHIP="deepspeed encodec megatron-core soxr soundfile cffi pycparser pydantic pydantic-core annotated-types
typing-inspection typing-extensions hjson packaging numpy msgpack psutil py-cpuinfo tqdm einops ninja"
SOURCE_ONLY="deepspeed encodec"
BUILD="setuptools wheel"
[ -n "$FULL" ] && SHIP="$("$PY" scripts/requirements_lock.py --beside-torch) typing-extensions"
[ -n "$ONLY" ] && { SHIP=${ONLY//,/ }; BUILD=""; }

"$PY" scripts/requirements_lock.py > "$DIR/requirements.lock"
pin() {  # NAME -> NAME==VERSION installed here (the lock), or NAME (BUILD tools not installed here)
    local v
    v=$(grep -i "^$(echo "$1" | sed 's/[-_.]/[-_.]/g')==" "$DIR/requirements.lock" | head -n1 || true)
    [ -n "$v" ] && { echo "$v"; return; }
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true)
    if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
download=() build=()
for name in $SHIP $BUILD; do
    if [[ " $SOURCE_ONLY " == *" $name "* ]]; then build+=("$(pin "$name")"); else download+=("$(pin "$name")"); fi
done
if [ ${#download[@]} -gt 0 ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORMS[@]}" -d "$DIR" "${download[@]}"
fi
if [ ${#build[@]} -gt 0 ]; then  # pure-Python wheels from the sdists (deepspeed with no ops prebuilt)
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DIR" "${build[@]}"
    for w in "$DIR"/deepspeed-*.whl "$DIR"/encodec-*.whl; do
        [ -e "$w" ] || continue
        case $w in *-py3-none-any.whl) ;; *) echo "gpu_wheels.sh: $w is not pure Python" >&2; exit 1 ;; esac
    done
fi
missing=""
for name in $SHIP $BUILD; do
    norm=$(echo "$name" | tr 'A-Z.-' 'a-z__')
    compgen -G "$DIR/$norm-*.whl" >/dev/null || missing="$missing $name"
done
[ -z "$missing" ] || { echo "gpu_wheels.sh: no wheel for:$missing" >&2; exit 1; }
mb=$(( ($(du -cb "$DIR"/*.whl | tail -n1 | cut -f1) + 999999) / 1000000 ))
echo "[gpu_wheels] $(ls "$DIR"/*.whl | wc -l) wheels, ${mb} MB, for CPython $PYVER manylinux x86_64 in $DIR" >&2
if [ -z "$FULL" ] && [ "$mb" -gt 60 ]; then echo "gpu_wheels.sh: ${mb} MB is over the 60 MB budget" >&2; exit 1; fi
