#!/usr/bin/env bash
# Builds the kernels with -fsanitize=address,undefined into a separate virtual environment and runs
# the ops tests and the native decoding step's tests (csrc/decode.cpp) under it. Fails on any sanitizer report.
set -euo pipefail
cd "$(dirname "$0")/.."
export MINILLM_VENV="${MINILLM_ASAN_VENV:-${TMPDIR:-/tmp}/minillm-asan-venv}"
. scripts/_venv.sh
# The CUDA launchers never run here; their kernels are checked under ThreadSanitizer by tests/cuda.
MINILLM_CUDA=OFF MINILLM_SANITIZE=ON python -m pip install -q --force-reinstall --no-deps .
python -m pip install -q numpy pytest hypothesis safetensors tokenizers tqdm
log="$(mktemp)"
status=0
# Python is not instrumented, so the ASan runtime must be loaded first, and libstdc++ with it: ASan's
# __cxa_throw interceptor aborts when libstdc++ was not loaded at its start (any C++ exception then
# kills the process). CPython's arenas look like leaks to LeakSanitizer, so leak detection is off.
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  pytest tests/ops tests/models/test_native_decode.py -q -p no:cacheprovider -k "not torch_compile" "$@" 2>&1 \
  | tee "$log" || status=$?
if grep -qE "ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer" "$log"; then
  echo "sanitize.sh: sanitizer reports found (see above)" >&2
  exit 1
fi
echo "sanitize.sh: no sanitizer reports"
exit "$status"
