#!/usr/bin/env bash
# On a machine with a GPU, a CUDA build of torch and nvcc: builds reggan_ext with CUDA, runs the
# whole test suite (CUDA tests included), compute-sanitizer (memcheck, racecheck) on a small
# kernel workload and the GPU benchmarks, and writes one report. The CUDA tests, the sanitizer and
# the benchmarks come before the rest of the suite, so a short lease still gets the GPU figures.
#   bash benchmarks/gpu_check.sh [REPORT_DIR]     (default: gpu_report/)
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch),
# STEP_TIMEOUT (seconds per step, default 1800), FULL_SUITE=0 to skip the CPU-only tests,
# SANITIZER_TOOLS (default "memcheck racecheck"; empty for none), QUICK=1 for the loop of kernel
# work on a short lease: the build, the local_regression CUDA tests, the x16 table and ncu.
set -uo pipefail
cd "$(dirname "$0")/.."
report_dir=${1:-gpu_report}
mkdir -p "$report_dir"
report="$report_dir/report.md"
py=${PYTHON:-python3}
# compute-sanitizer and ncu come with the toolkit, which need not be on PATH.
export PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin"
status=0

step() {  # step TITLE COMMAND...: runs the command, appends its output and duration to the report.
  local title=$1; shift
  echo "== $title"
  { printf '\n## %s\n\n```\n$ %s\n' "$title" "$*"; } >> "$report"
  local start=$SECONDS rc=0
  timeout "${STEP_TIMEOUT:-1800}" "$@" > "$report_dir/step.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    tail -n "${TAIL_LINES:-60}" "$report_dir/step.log" >> "$report"
  else
    status=1
    tail -n 200 "$report_dir/step.log" >> "$report"
    printf '\n(exit code %d%s)\n' "$rc" "$([ "$rc" = 124 ] && echo ', timed out')" >> "$report"
  fi
  printf '(%d s)\n```\n' "$((SECONDS - start))" >> "$report"
}

printf '# reggan-ext GPU check, %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" > "$report"
step "device" sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -n 2; $py -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda)'"
arch=$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
# An in-place build: an editable pip install goes through `setup.py develop`, whose inner pip
# fetches build dependencies on machines that cannot reach an index.
step "build with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" env REGGAN_EXT_CUDA=1 MAX_JOBS=16 \
  $py setup.py build_ext --inplace
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
step "CUDA kernels registered" $py -c "import reggan_ext; assert reggan_ext.cuda_built(); print('ok')"
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then
  step "CUDA tests (local_regression)" $py -m pytest -q -p no:cacheprovider \
    tests/test_local_regression_cuda.py
else
  step "CUDA tests" $py -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests
  for tool in ${SANITIZER_TOOLS-memcheck racecheck}; do
    step "compute-sanitizer --tool $tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      $py benchmarks/gpu_sanitizer_workload.py
  done
  step "benchmark local_regression_table (CUDA, the issue's batches)" \
    $py benchmarks/local_regression_table.py --device cuda
fi
step "benchmark local_regression_table (CUDA, batches x16)" \
  $py benchmarks/local_regression_table.py --device cuda --batch-multiplier 16
[ "$quick" = 1 ] || step "benchmark ridge_table (CUDA)" $py benchmarks/ridge_table.py --device cuda
# Where the time goes: throughput, occupancy and stall reasons of the three kernels on the
# per-channel k3 case with 256 images (clocks left alone, as ncu would otherwise lock them).
# The whole output goes to ncu.txt; the report keeps the lines that say most.
step "ncu: local_regression kernels, N256 per-channel 128x128 k3 (all of it in ncu.txt)" \
  sh -c "ncu --clock-control none \
    -k 'regex:forward_kernel|backward_input_kernel|backward_weight_kernel|sum_splits_kernel' \
    -c 4 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    $py benchmarks/gpu_ncu_workload.py > '$report_dir/ncu.txt' 2>&1 &&
    grep -E '_kernel<|Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Registers|Achieved Occupancy|Warp Cycles Per Issued|stalled|represents about' \
      '$report_dir/ncu.txt'"
if [ "$quick" != 1 ] && [ "${FULL_SUITE:-1}" != 0 ]; then
  # The application's tests first: with a GPU present they train and synthesize on it.
  step "the rest of the tests" $py -m pytest -q -p no:cacheprovider -k "not cuda" \
    tests/test_reggan_app.py tests/test_reggan_evaluate.py tests
fi
rm -f "$report_dir/step.log"
echo "report: $report"
exit $status
