#!/usr/bin/env bash
# The GPU loop in one call: on a GPU machine with no network, install the OpenMMLab stack from the
# wheels in $DEVICE_DIR (a copy of shared/device), build the CUDA extension for sm_90, run the `cuda`
# tests and the benchmarks, and write logs and tables to $OUT.
#
# Usage: tools/gpu_check.sh [STAGE ...]   stages: setup build test bench-op bench-msda bench-deterministic
#        bench-backbone bench-models
#        (default: all of them, in that order). Environment: OUT (default ./gpu_out), DEVICE_DIR
#        (default ./.device), TORCH_CUDA_ARCH_LIST (default 9.0), PYTEST_ARGS, TEST_PATHS (default tests).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
device_dir=${DEVICE_DIR:-.device}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(setup build test bench-op bench-msda bench-deterministic bench-backbone bench-models)
summary="$out/summary.md"
echo "# gpu_check $(date -u +%FT%TZ)" > "$summary"
status=0

step() {  # step NAME COMMAND...: runs, logs to $out/NAME.log, records time and exit code
  local name=$1; shift
  local start=$(date +%s%N)
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf -- '- %s: exit %d, %d.%03d s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) | tee -a "$summary"
  [ $rc -eq 0 ] || { status=1; tail -25 "$out/$name.log"; }
  return $rc
}

for stage in "${stages[@]}"; do
  case $stage in
    setup) step setup bash "$device_dir/setup.sh" ;;
    build) step build env MMDCNV4_WITH_CUDA=1 python3 setup.py build_ext --inplace ;;
    test)
      step test python3 -m pytest -m cuda -q -p no:cacheprovider ${PYTEST_ARGS:-} ${TEST_PATHS:-tests}
      tail -3 "$out/test.log" | tee -a "$summary" ;;
    bench-op) step bench-op python3 tools/benchmark_op.py --out "$out/dcnv4_op.md" ;;
    bench-msda) [ -f tools/benchmark_msda.py ] && step bench-msda python3 tools/benchmark_msda.py --out "$out/msda.md" ;;
    bench-deterministic)
      step bench-op-deterministic python3 tools/benchmark_op.py --deterministic --out "$out/dcnv4_op_deterministic.md"
      step bench-msda-deterministic python3 tools/benchmark_msda.py --deterministic --out "$out/msda_deterministic.md" ;;
    bench-backbone) [ -f tools/benchmark_backbone.py ] &&
      step bench-backbone python3 tools/benchmark_backbone.py --out "$out/backbone.md" ;;
    bench-models)
      step bench-det python3 tools/benchmark_models.py --task det --amp --out "$out/detection.md"
      step bench-seg python3 tools/benchmark_models.py --task seg --amp --out "$out/segmentation.md" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
cat "$summary"
exit $status
