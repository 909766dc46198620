#!/usr/bin/env bash
# Installs minillm (native build) with its test extras into a virtual environment and runs the tests.
# Arguments go to pytest, e.g. `bash scripts/test.sh tests/ops -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q ".[test]"
# Plain `pytest`, not `python -m pytest`: the latter puts the source tree (no built extension) first on sys.path.
pytest "$@"
