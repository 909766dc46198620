#!/usr/bin/env bash
# Installs minillm into a virtual environment and runs the quick-start demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q ".[pretrained]"  # MiniLM embeddings for the retrieval step
cd "${TMPDIR:-/tmp}"  # import the installed package, not the source tree
minillm quickstart "$@"
