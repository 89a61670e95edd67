# Sourced by scripts/test.sh and scripts/demo.sh: Debian packages, .venv, the package itself.
# Leaves the venv activated and the CPU settings exported.
APT_PACKAGES="slurm-wlm munge espeak-ng sox"

need_apt=""
for cmd in slurmctld munged espeak-ng sox; do
    command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
if [ -n "$need_apt" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian packages: $APT_PACKAGES" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
    else
        echo "[setup] missing some of: $APT_PACKAGES (not root or no apt-get); tests needing them will say so" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

stamp=.venv/.unimoe-install-stamp
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing unimoe-audio and its test and metrics extras into .venv" >&2
    python -m pip install -q --upgrade pip >/dev/null
    if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
        # No GPU: the CPU build of torch (1 GB instead of 5 GB of CUDA wheels), when this index has it.
        python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || python -m pip install -q "torch==2.13.0" \
            2>/dev/null || true
    fi
    python -m pip install -q -e ".[test,metrics]"
    echo "$want" > "$stamp"
fi

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# TORCH_EXTENSIONS_DIR: the `unimoe` CLI sets its default (training/cli.py), for every entry point
