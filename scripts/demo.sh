#!/usr/bin/env bash
# The demo command: bash scripts/demo.sh [unimoe demo args, e.g. --minutes 5 --out runs/demo]
# On a fresh machine it installs the Debian packages it needs (as root), creates .venv and installs
# the package (scripts/setup_env.sh, shared with scripts/test.sh), then runs the whole pipeline on
# the built-in corpus: `unimoe demo`. Re-running it is fast: set-up steps are skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec unimoe demo "$@"
