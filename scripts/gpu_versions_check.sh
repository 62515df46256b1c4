#!/usr/bin/env bash
# The GPU machine's package versions, on any CPU machine: torch 2.11, torchvision 0.26 and
# Triton 3.6 (what the lent H200 image holds; CI runs the newest), in a venv of their own. Builds
# the extension there (the CUDA kernels too, as gpu_check.sh will) from a copy of the committed
# tree, then runs the test suite, so that a break against the older torch or Triton (a header, an
# API, a compiler rule) shows before a GPU session is spent on it.
#   bash scripts/gpu_versions_check.sh [WORK_DIR [PYTEST_ARGS...]]
# WORK_DIR defaults to /tmp/ptl_gpu_versions (about 6 GB); PYTEST_ARGS to the whole suite (25
# minutes on 2 cores). CI runs it on the tests that lean on torch's and Triton's internals
# (compile, export, dispatch, autograd, Triton's sm_90 compile): torch 2.11's tracer once sent
# every compiled cell to the reference, which only the older versions showed.
# NumPy stays below 2.4 here: Triton 3.6's CPU interpreter fails with newer NumPy (the suite then
# reports the Triton backend unavailable and skips it); on the GPU the interpreter is not used.
set -euo pipefail
work=${1:-/tmp/ptl_gpu_versions}
shift $(($# > 0 ? 1 : 0))
tests=("$@")
((${#tests[@]})) || tests=(tests bench --benchmark-disable)
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
[[ -x $work/venv/bin/python ]] || python3 -m venv "$work/venv"
source "$work/venv/bin/activate"
pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4" -r "$repo/requirements-dev.txt"
rm -rf "$work/src" && mkdir "$work/src"
git -C "$repo" archive HEAD | tar -x -C "$work/src"  # never the working tree's build in place
cd "$work/src"
PTL_FUSED_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation --no-deps -e .
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# A JIT extension cache of its own: the emulated-kernel test builds one per torch version.
TORCH_EXTENSIONS_DIR=$work/torch_extensions python -m pytest "${tests[@]}" -q -p no:cacheprovider
