#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#   bash scripts/test.sh [pytest args...]
# Creates .venv (torch pinned to the local CPU wheel first, so nothing pulls CUDA torch),
# installs the project with the `dev` extra and the Debian packages the tests drive
# (Prometheus, Chromium and chromedriver), and points the CIFAR tests at ../shared/data when it
# exists. With CI=true the web page tests fail, rather than skip, when the browser is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/install-system-deps.sh

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"

if [ -z "${EARLYEXIT_DATA:-}" ] && [ -d ../shared/data/cifar-10-batches-py ]; then
    EARLYEXIT_DATA="$(cd ../shared/data && pwd)"
    export EARLYEXIT_DATA
fi
echo "EARLYEXIT_DATA=${EARLYEXIT_DATA:-<unset: CIFAR tests will skip>}"
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "web page tests: headless Chromium $(command -v chromedriver)"
else
    echo "web page tests: chromium or chromedriver missing (they will skip; with CI=true, fail)"
fi

ruff check core training thresholds serving benchmarks tests scripts
ruff format --check core training thresholds serving benchmarks tests scripts
# Strict types on the torch-free packages (settings and plugins in pyproject's [tool.mypy]).
mypy core thresholds serving benchmarks
# pytest exits 5 when it collects nothing, so an empty suite fails here too.
python -m pytest -q "$@"
