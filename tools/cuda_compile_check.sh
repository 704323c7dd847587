#!/usr/bin/env bash
# Compile-checks the CUDA sources for sm_90 on a machine that has nvcc but only a CPU build of torch
# (no GPU needed): catches compile errors and shows registers/spills (ptxas -v) before a GPU run.
# Usage: tools/cuda_compile_check.sh [FILE.cu ...]   (default: every csrc/*/cuda/*.cu)
# PYTHON selects the interpreter whose torch headers are used (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
command -v nvcc >/dev/null || { echo "cuda_compile_check: nvcc not found" >&2; exit 1; }
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(csrc/*/cuda/*.cu)
includes=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
pyinclude=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# CPU wheels ship the CUDA headers but not this generated one.
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
status=0
for f in "${files[@]}"; do
  echo "== $f"
  nvcc -std=c++20 -arch=sm_90 -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas -v -diag-suppress 3306 \
    -c "$f" -o "$stub/$(basename "$f").o" -Icsrc -I"$stub" $includes -I"$pyinclude" \
    -DTORCH_EXTENSION_NAME=_C -DMMDCNV4_WITH_CUDA 2>&1 |
    grep -E "error|warning|spill|registers" | grep -v "Wc++20-extensions" || true
  [ -f "$stub/$(basename "$f").o" ] || status=1
done
exit $status
