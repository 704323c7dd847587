#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with the pinned OpenMMLab stack and mmdcnv4 built in place.
# `make demo` and `make test` call it; it is idempotent and quick once everything is there.
#
# Usage: tools/setup_env.sh [VENV_DIR]              (default: .venv in the repository)
# Environment:
#   PYTHON         interpreter for a new venv (default: python3). If it already has torch (a CUDA build,
#                  say), the venv sees it (--system-site-packages) and it is kept.
#   TORCH_SPEC     the torch to install when there is none (default: torch==2.13.0)
#   MMDCNV4_CACHE  where the built mmcv wheel is kept between venvs (default: ~/.cache/mmdcnv4)
#   MAX_JOBS       parallel compile jobs (default: number of cores)
set -euo pipefail

die() { printf '\nsetup: %s\n' "$*" >&2; exit 1; }
say() { printf 'setup: %s\n' "$*"; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$root/.venv}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
cache=${MMDCNV4_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdcnv4}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
mmcv_version=2.1.0

# --- what the machine must have -------------------------------------------------------------------------
command -v "$python" >/dev/null 2>&1 || die "no '$python' on PATH: install Python 3.10-3.12 or set PYTHON=/path/to/python3."
"$python" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' ||
  die "$("$python" --version 2>&1) found, but mmdcnv4 needs Python 3.10, 3.11 or 3.12 (torch >= 2.6 and mmcv 2.1.0). Set PYTHON=/path/to/python3.x."
cxx=${CXX:-$(command -v c++ || command -v g++ || true)}
[ -n "$cxx" ] || die "no C++ compiler found (c++ or g++): mmcv and mmdcnv4 compile C++ ops. Install one (Debian/Ubuntu: apt-get install g++)."
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  say "no CUDA toolkit (nvcc) found: the CPU kernels only will be built."
fi

# --- the virtual environment ----------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  venv_flags=()
  if "$python" -c 'import torch' >/dev/null 2>&1; then
    say "$python already has torch $("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null): the venv will use it."
    venv_flags=(--system-site-packages)
  fi
  say "creating $venv"
  "$python" -m venv "${venv_flags[@]}" "$venv" ||
    die "could not create a venv with $python (on Debian/Ubuntu: apt-get install python3-venv)."
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  say "installing $torch_spec"
  pip install -q "$torch_spec" || die "could not install $torch_spec (set TORCH_SPEC to the torch you want)."
fi
torch_version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)

# The pinned stack, skipped when the requirement files and torch are unchanged since the last run.
stamp="$venv/.mmdcnv4-stack"
want="$(cat "$root/requirements/stack.txt" "$root/requirements/mmdet3d.txt" | sha1sum | cut -c1-16) torch=$torch_version"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the pinned stack (requirements/stack.txt) for torch $torch_version"
  pip install -q wheel ninja -r "$root/requirements/stack.txt" || die "installing requirements/stack.txt failed (see above)."
  pip install -q --no-deps -r "$root/requirements/mmdet3d.txt" || die "installing requirements/mmdet3d.txt failed."
  rm -f "$stamp"
fi

# --- mmcv 2.1.0 with ops, built once per (torch, python) and cached outside the repository -------------------
if ! "$py" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$mmcv_version'" >/dev/null 2>&1; then
  key="torch-$torch_version-$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  wheel_dir="$cache/mmcv-$mmcv_version/$key"
  wheel=$(ls "$wheel_dir"/mmcv-$mmcv_version-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    say "building mmcv $mmcv_version with ops against torch $torch_version ($MAX_JOBS jobs; about 10 minutes on 2 cores)."
    say "the wheel is cached in $wheel_dir for the next venv."
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # mmcv 2.1.0's setup.py imports pkg_resources, which new setuptools lacks, and torch needs a new
    # setuptools: the old one goes on PYTHONPATH for this build only.
    pip install -q --target "$work/setuptools" "setuptools<70" || die "could not fetch setuptools<70."
    force_cuda=0
    if "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' && command -v nvcc >/dev/null 2>&1; then
      force_cuda=1  # CUDA ops even when this machine has no GPU to probe
    fi
    PYTHONPATH="$work/setuptools" MMCV_WITH_OPS=1 FORCE_CUDA=$force_cuda pip wheel -q --no-deps --no-build-isolation \
      --no-binary mmcv "mmcv==$mmcv_version" -w "$work/wheel" || die "building mmcv $mmcv_version failed (see above)."
    mkdir -p "$wheel_dir"
    cp "$work"/wheel/mmcv-*.whl "$wheel_dir/.partial.whl"
    wheel="$wheel_dir/$(basename "$work"/wheel/mmcv-*.whl)"
    mv "$wheel_dir/.partial.whl" "$wheel"
  else
    say "using the cached mmcv wheel $wheel"
  fi
  pip install -q --no-deps --force-reinstall "$wheel" || die "installing $wheel failed."
fi
[ -f "$stamp" ] || echo "$want" > "$stamp"

# --- mmdcnv4 itself, built in place (incremental) and put on the venv's path -----------------------------------
say "building mmdcnv4._C"
(cd "$root" && "$py" setup.py -q build_ext --inplace >"$venv/.mmdcnv4-build.log" 2>&1) || {
  tail -40 "$venv/.mmdcnv4-build.log" >&2
  die "building mmdcnv4._C failed; the full log is $venv/.mmdcnv4-build.log."
}
grep -h '^mmdcnv4:' "$venv/.mmdcnv4-build.log" || true
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root" > "$site/mmdcnv4-dev.pth"
"$py" -c 'import mmdcnv4, mmcv, mmdet, mmseg, mmdet3d, torch; print(f"setup: ready: mmdcnv4 {mmdcnv4.__version__}, torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmdet3d {mmdet3d.__version__}")' ||
  die "the environment does not import (see above)."
