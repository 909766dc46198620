#!/usr/bin/env bash
# One command for a machine with a CUDA GPU, nvcc and torch already installed, and no network: builds minillm
# with the local nvcc for this GPU's own architecture, runs the real-GPU tests, times minillm's CUDA kernels
# against torch, and prints the rows of the CUDA dispatch table (minillm/ops/_backend.py) the ratios justify.
#
#   bash scripts/gpu_check.sh [--quick] [--dry-run]
#
# --quick: bf16 attention at D 64 and top-k at Q 1 and 256 only (<= 3 minutes on one H200, build included);
# the default run (<= 8 minutes there) covers bf16/fp16/fp32 attention at N 1k-8k, D 64 and 128, causal and
# not, padded and not, forward and forward + backward, and top-k over 1M x 384 at Q 1/16/256/4096 for fp32,
# bf16 and fp16 corpora. --dry-run prints the steps without running them (CI runs it).
#
# Needs: python3 with torch (CUDA build), pytest, scikit-build-core >= 0.10, pybind11 >= 2.12, cmake, nvcc.
# Results go to $OUT when set, else ./gpu-results: gpu_check.log (everything printed), build.log,
# attention.json and topk.json (every run's rows), dispatch_rows.txt. The build and its Python target
# directory live in a temporary directory; nothing is written into the source tree.
# Environment: PYTHON (default python3), MINILLM_GPU_BUDGET_S (seconds for the whole run; steps that would
# start after it are skipped, and each bench step is stopped at what is left).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

QUICK=0
DRY=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --quick, --dry-run or --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
RESULTS="${OUT:-$REPO/gpu-results}"
if [ "$QUICK" = 1 ]; then BUDGET="${MINILLM_GPU_BUDGET_S:-170}"; else BUDGET="${MINILLM_GPU_BUDGET_S:-470}"; fi
START=$SECONDS
FAILED=()

if [ "$DRY" = 1 ]; then
  WORK='$WORK'
else
  mkdir -p "$RESULTS"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/minillm-gpu.XXXXXX")"
  exec > >(tee "$RESULTS/gpu_check.log") 2>&1
fi
SITE="$WORK/site"
RAW="$WORK/raw"

# run NAME CAP CMD...: one step, stopped after min(CAP, what is left of the budget) seconds; a failure is
# recorded and the next step runs (a crashed kernel takes its process down, not the whole check). With
# LOGTO=FILE set, the step's output goes to FILE instead.
LOGTO=""
run() {
  local name="$1" cap="$2"
  shift 2
  if [ "$DRY" = 1 ]; then
    printf '== %s (at most %ss)\n   %s\n' "$name" "$cap" "$*"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -le 10 ]; then
    echo "== $name: skipped, the ${BUDGET}s budget is spent"
    FAILED+=("$name (skipped: budget)")
    return 0
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (at most ${limit}s; $((SECONDS - START))s elapsed)"
  local t0=$SECONDS rc=0
  if [ -n "$LOGTO" ]; then
    timeout --kill-after=10 "$limit" "$@" >"$LOGTO" 2>&1 || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" || rc=$?
  fi
  echo "-- $name: exit $rc after $((SECONDS - t0))s"
  if [ "$rc" != 0 ]; then FAILED+=("$name (exit $rc)"); fi
  return 0
}

if [ "$DRY" = 1 ]; then
  ARCH='<the GPU compute capability, e.g. 90>'
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  ARCH="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null)" || ARCH=""
  if [ -z "$ARCH" ]; then
    echo "gpu_check.sh: torch sees no CUDA device ($PY -c 'import torch; torch.cuda.get_device_capability()' failed)" >&2
    exit 1
  fi
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name())'
  command -v nvcc >/dev/null && nvcc --version | tail -2
  mkdir -p "$RAW"
fi

# 1. Build for this GPU's architecture only (a fraction of the default sm_80 + sm_90 build's time), into a
# target directory: the machine's own torch and packages are used as they are (no isolation, no downloads).
LOGTO="$RESULTS/build.log"
run "build (sm_$ARCH)" 300 env MINILLM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install -v \
  --no-build-isolation --no-deps --no-index --target "$SITE" -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" .
LOGTO=""
if [ "$DRY" = 0 ]; then
  grep -E "^ *-- minillm:" "$RESULTS/build.log" | sed -E 's/^ *//'
  if [ ! -d "$SITE/minillm" ]; then
    tail -60 "$RESULTS/build.log"
    echo "gpu_check.sh: the build failed; see $RESULTS/build.log" >&2
    exit 1
  fi
fi

# The installed package, not the source tree (which has no extension): run from $SITE with it first on the path.
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
in_site=(bash -c 'cd "$0" && exec "$@"' "$SITE")

# 2. The real-GPU tests: every kernel (forced on) and the default path against the fp64 reference.
run "tests/cuda on the GPU" 200 "${in_site[@]}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 \
  "$REPO/tests/cuda/test_gpu.py" "$REPO/tests/cuda/test_dispatch.py"

# 3. Benchmarks. "minillm" is timed with MINILLM_CUDA_KERNELS=off, so it is the torch path minillm takes
# without a table row; "kernel" forces minillm's CUDA kernel; "sdpa"/"torch" are torch's own functions.
ATTN=()
attention() {  # dtype D cap N...
  local dt="$1" d="$2" cap="$3"
  shift 3
  ATTN+=("$RAW/attention-$dt-d$d.json")
  run "bench_attention $dt D=$d" "$cap" env MINILLM_CUDA_KERNELS=off "$PY" "$REPO/benchmarks/bench_attention.py" \
    --device cuda --dtype "$dt" --d "$d" --n "$@" --repeats 3 --no-memory --json "$RAW/attention-$dt-d$d.json"
}
topk() {  # cap, then bench_topk arguments
  local cap="$1"
  shift
  run "bench_topk" "$cap" env MINILLM_CUDA_KERNELS=off "$PY" "$REPO/benchmarks/bench_topk.py" --device cuda \
    --n 1000000 --d 384 "$@" --json "$RAW/topk.json"
}
if [ "$QUICK" = 1 ]; then
  attention bfloat16 64 60 1024 4096
  topk 45 --queries 1 256 --corpus-dtype float32 bfloat16
else
  attention bfloat16 64 70 1024 2048 4096 8192
  attention bfloat16 128 80 1024 2048 4096 8192
  topk 100 --queries 1 16 256 4096 --corpus-dtype float32 bfloat16 float16
  attention float16 64 50 1024 4096 8192
  attention float16 128 60 1024 4096 8192
  attention float32 64 60 1024 4096 8192
  attention float32 128 70 1024 4096 8192
fi

# 4. The rows the ratios justify, and the runs merged into $RESULTS.
run "dispatch-table rows" 60 "$PY" "$REPO/scripts/gpu_table.py" --attention "${ATTN[@]}" --topk "$RAW/topk.json" \
  --out-dir "$RESULTS"

if [ "$DRY" = 1 ]; then
  exit 0
fi
echo "== gpu_check.sh done in $((SECONDS - START))s; results in $RESULTS"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'failed or skipped: %s\n' "${FAILED[@]}"
  exit 1
fi
