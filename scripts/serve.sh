#!/usr/bin/env bash
# Install only the serving dependencies (no torch) and serve the shipped default bundle.
#   bash scripts/serve.sh [earlyexit-serve flags...]      e.g. --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-serve/bin/python ]; then
    python3 -m venv .venv-serve
fi
# shellcheck disable=SC1091
. .venv-serve/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[serve]"
exec earlyexit-serve "$@"
