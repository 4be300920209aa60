#!/usr/bin/env bash
# On a machine with a GPU, a CUDA build of torch and nvcc: builds reggan_ext with CUDA, runs the
# whole test suite (CUDA tests included), compute-sanitizer (memcheck, racecheck) on a small
# kernel workload and the GPU benchmarks, and writes one report.
#   bash benchmarks/gpu_check.sh [REPORT_DIR]     (default: gpu_report/)
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch).
set -uo pipefail
cd "$(dirname "$0")/.."
report_dir=${1:-gpu_report}
mkdir -p "$report_dir"
report="$report_dir/report.md"
py=${PYTHON:-python3}
status=0

step() {  # step TITLE COMMAND...: runs the command, appends its output to the report.
  local title=$1; shift
  echo "== $title"
  { printf '\n## %s\n\n```\n$ %s\n' "$title" "$*"; } >> "$report"
  if "$@" > "$report_dir/step.log" 2>&1; then
    tail -n 60 "$report_dir/step.log" >> "$report"
  else
    local rc=$?
    status=1
    tail -n 200 "$report_dir/step.log" >> "$report"
    printf '\n(exit code %d)\n' "$rc" >> "$report"
  fi
  printf '```\n' >> "$report"
}

printf '# reggan-ext GPU check, %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" > "$report"
step "device" sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -n 2; $py -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda)'"
arch=$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
step "build with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" env REGGAN_EXT_CUDA=1 MAX_JOBS=8 \
  $py -m pip install --no-build-isolation --no-deps -e .
step "CUDA kernels registered" $py -c "import reggan_ext; assert reggan_ext.cuda_built(); print('ok')"
step "tests (CPU and CUDA)" $py -m pytest -q -p no:cacheprovider tests
for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
    $py benchmarks/gpu_sanitizer_workload.py
done
for table in benchmarks/*_table.py; do
  step "benchmark $(basename "$table" .py) (CUDA)" $py "$table" --device cuda
done
rm -f "$report_dir/step.log"
echo "report: $report"
exit $status
