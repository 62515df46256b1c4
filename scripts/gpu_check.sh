#!/usr/bin/env bash
# One call on a GPU machine: build against the installed torch (no registry needed), run the
# test suite on the GPU and the benchmark, and write everything to a folder.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu_results/)
set -uo pipefail
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"

if ! python3 -c "import pytest, pytest_benchmark" 2>/dev/null; then
  wheels=../shared/gpu-wheels
  [[ -d $wheels ]] || wheels=shared/gpu-wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/ptl_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/ptl_site:${PYTHONPATH:-}
fi

{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/env.txt" 2>&1
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || {
  tail -60 "$out/build.log"
  exit 1
}
python3 -m pytest tests -q -ra > "$out/tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$out/tests.log"))"
python3 -m pytest bench --bench-set all --benchmark-json="$out/bench.json" -q > "$out/bench.log" 2>&1
echo "bench: exit $? ($(tail -1 "$out/bench.log"))"
