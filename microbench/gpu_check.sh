#!/usr/bin/env bash
# One-shot check on a fresh GPU machine (PyTorch and Triton installed, no network):
#   1. builds the CUDA extension when nvcc is there (for the local GPU's arch),
#   2. runs the test suite on the GPU,
#   3. runs `python -m microbench all` at the default presets, with JSON/CSV output,
#   4. runs the kernels' tests under compute-sanitizer: memcheck over the per-op
#      GPU tests and the fuzz test, racecheck over the CUDA kernels' tests; each
#      must report 0 errors (issue 14: no index value reads or writes outside
#      its tensors). Skipped without compute-sanitizer.
# Logs, JSON and a summary go to OUTDIR. Every step has a timeout; the defaults
# add up to under 12 minutes (override: BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT,
# MEMCHECK_TIMEOUT, RACECHECK_TIMEOUT, in seconds; PYTHON picks the interpreter).
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
MEMCHECK_TIMEOUT=${MEMCHECK_TIMEOUT:-190}
RACECHECK_TIMEOUT=${RACECHECK_TIMEOUT:-80}
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

# 2b. The cuda backend's GPU tests again on the no-build path (NVRTC-compiled kernels
#     launched through cuda.bindings; docs/cuda.md, "No-build path (NVRTC)").
if "$PY" -c "import cuda.bindings.driver, cuda.bindings.nvrtc" 2>/dev/null; then
    DFLASH_KERNELS_CUDA_JIT=1 step nvrtc "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_cuda_ops.py tests/test_cuda_nvrtc.py -k "gpu or cuda"
    tail -n 3 "$OUT/nvrtc.log" | sed 's/^/  /' | tee -a "$SUMMARY"
else
    note "nvrtc: skipped (cuda.bindings not installed)"
fi

# 3. The benchmark at the default presets; --budget stops it cleanly before the timeout
#    so that the JSON is always written.
PLOT=()
"$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/bench.png")
step bench "$BENCH_TIMEOUT" "$PY" -m microbench all --quiet --budget $((BENCH_TIMEOUT - 45)) \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" ${PLOT[@]+"${PLOT[@]}"}
grep -E "FAIL|ERROR|skipped|FAILED" "$OUT/bench.log" | head -20 | sed 's/^/  /' | tee -a "$SUMMARY"

# 4. compute-sanitizer. PyTorch's caching allocator would hide an access past a tensor
#    inside its pool: PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own
#    allocation, so memcheck sees it. --error-exitcode makes any error fail the step.
SAN=$(command -v compute-sanitizer || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] \
      && echo "$CUDA_HOME/bin/compute-sanitizer"; } || { [ -x /usr/local/cuda/bin/compute-sanitizer ] \
      && echo /usr/local/cuda/bin/compute-sanitizer; })
if [ -n "$SAN" ]; then
    SAN_ARGS=(--error-exitcode 1 --target-processes all --print-limit 20)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck "$MEMCHECK_TIMEOUT" "$SAN" --tool memcheck \
        "${SAN_ARGS[@]}" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py \
        tests/test_verify_chain_triton.py tests/test_inject_kv_triton.py tests/test_write_kv_triton.py \
        tests/test_fuse_target_features_triton.py tests/test_block_attention_triton.py tests/test_fuzz.py \
        -k "not compiles and not graph"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -n 3 | sed 's/^/  /' | tee -a "$SUMMARY"
    step racecheck "$RACECHECK_TIMEOUT" "$SAN" --tool racecheck "${SAN_ARGS[@]}" \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py -k "gpu or cuda"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -n 3 \
        | sed 's/^/  /' | tee -a "$SUMMARY"
else
    note "sanitizer: skipped (no compute-sanitizer)"
fi

note "overall: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
