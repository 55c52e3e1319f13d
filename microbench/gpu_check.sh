#!/usr/bin/env bash
# One-shot check on a fresh GPU machine (PyTorch and Triton installed, no network):
#   1. builds the CUDA extension when nvcc is there (for the local GPU's arch),
#   2. runs the test suite on the GPU,
#   3. runs `python -m microbench all` at the default presets, with JSON/CSV output.
# Logs, JSON and a summary go to OUTDIR. Every step has a timeout; the defaults
# add up to under 8 minutes (override: BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT,
# in seconds; PYTHON picks the interpreter).
#
# usage: microbench/gpu_check.sh OUTDIR
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2          # the repository root
PY=${PYTHON:-python}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-140}
TEST_TIMEOUT=${TEST_TIMEOUT:-170}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-140}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# Runs "$@" under a timeout with its output in $OUT/$name.log; records the exit code.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local why=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why=" (timed out after ${limit}s)"
    note "$name: exit $rc$why in $((SECONDS - t0))s -> $OUT/$name.log"
    [ $rc -eq 0 ] || status=1
    return $rc
}

{
    date -u
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    git log -1 --oneline 2>/dev/null
} > "$OUT/env.log" 2>&1
note "env: $(tail -n 3 "$OUT/env.log" | tr '\n' ' ')"

# 1. The extension, for the local GPU only (arch-specific "a" targets on sm_90 / sm_100).
NVCC=$(command -v nvcc || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && echo "$CUDA_HOME/bin/nvcc"; })
if [ -n "$NVCC" ]; then
    ARCH=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(0); \
print(f'{M}.{m}' + ('a' if M in (9, 10) else ''))" 2>/dev/null)
    note "build: nvcc at $NVCC, TORCH_CUDA_ARCH_LIST=${ARCH:-?}"
    TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} \
        step build "$BUILD_TIMEOUT" "$PY" -m pip install -e . --no-build-isolation --no-deps
else
    note "build: skipped (no nvcc; the cuda backend stays unavailable, triton and reference run)"
fi

# 2. The test suite on the GPU (junit XML for the per-test record).
step tests "$TEST_TIMEOUT" "$PY" -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/tests.xml"
tail -n 3 "$OUT/tests.log" | sed 's/^/  /' | tee -a "$SUMMARY"

# 3. The benchmark at the default presets; --budget stops it cleanly before the timeout
#    so that the JSON is always written.
PLOT=()
"$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/bench.png")
step bench "$BENCH_TIMEOUT" "$PY" -m microbench all --quiet --budget $((BENCH_TIMEOUT - 45)) \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" ${PLOT[@]+"${PLOT[@]}"}
grep -E "FAIL|ERROR|skipped|FAILED" "$OUT/bench.log" | head -20 | sed 's/^/  /' | tee -a "$SUMMARY"

note "overall: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
