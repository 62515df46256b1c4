#!/usr/bin/env bash
# One call on a GPU machine: build against the installed torch (no registry needed), run the
# GPU tests, then the benchmark, writing everything to one folder.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu_results/)
#
# Sized for a lent session (15 device minutes in all, 10 per command): every stage has its own
# time box (seconds, overridable), so the script ends inside ~9 minutes and what finished comes
# back even when a later stage runs out of time. The benchmark runs first without, then with
# the torch.compile rows (compiling is the slow part), and the two JSONs are merged into one
# table. FULL=1: every test and `--bench-set all` with max-autotune, no time boxes (a longer
# session). LAYOUT=channels_last: the benchmark's tensors (and network) in channels_last.
# Files written (at most 8 come back from a device call): env.txt build.log tests.log
# bench.log bench.json bench.md bench.png.
set -uo pipefail
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
full=${FULL:-0}
box() { if [[ $full == 1 ]]; then echo 0; else echo "$1"; fi; }  # timeout 0: none
# SIGINT first: pytest then stops its xdist workers and still writes its summary and the
# benchmark JSON of the rows done so far; KILL 15 s later if anything lingers.
boxed() { timeout -s INT -k 15 "$@"; }
t_build=$(box "${BUILD_S:-170}") t_tests=$(box "${TESTS_S:-180}")
t_bench=$(box "${BENCH_S:-120}") t_compile=$(box "${COMPILE_S:-60}")
start=$SECONDS

if ! python3 -c "import pytest, pytest_benchmark" 2>/dev/null; then
  wheels=../shared/gpu-wheels
  [[ -d $wheels ]] || wheels=shared/gpu-wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/ptl_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/ptl_site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1

{
  nvidia-smi
  python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)"
} > "$out/env.txt" 2>&1
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "gpu_check: torch sees no CUDA device (env.txt)"
  exit 1
}

export MAX_JOBS=${MAX_JOBS:-16}
boxed "$t_build" python3 -m pip install --no-build-isolation --no-deps -e . \
  > "$out/build.log" 2>&1 || {
  tail -60 "$out/build.log"
  exit 1
}
echo "build: done after $((SECONDS - start)) s"

# The GPU tests (every cuda/triton/cuda_igemm parametrisation and tests/test_gpu.py; the rest
# runs in CI), in parallel processes where pytest-xdist is installed. FULL=1: every test, in
# one process (the DDP tests start process groups of their own).
# Boxed, Triton runs its first autotune config untuned (each odd test shape would compile and
# time all seven; tests/test_triton_compile.py compiles every config in CI); FULL=1 tunes.
sel=(-m gpu) par=() tune=0
python3 -c "import xdist" 2>/dev/null && par=(-n 8)
[[ $full == 1 ]] && sel=() par=() tune=1
PTL_FUSED_TRITON_AUTOTUNE=$tune boxed "$t_tests" python3 -m pytest tests "${sel[@]}" "${par[@]}" -q -ra -p no:cacheprovider \
  > "$out/tests.log" 2>&1
echo "tests: exit $? after $((SECONDS - start)) s ($(tail -1 "$out/tests.log"))"

# The benchmark: the backends beside eager first, then the compile rows, merged.
rm -f /tmp/ptl_bench_main.json /tmp/ptl_bench_compile.json  # a warm machine's last run
set_=table compile_mode=default rounds=(--benchmark-max-time=0.25 --benchmark-min-rounds=10)
[[ $full == 1 ]] && set_=all compile_mode=max-autotune-no-cudagraphs rounds=()
bench=(python3 -m pytest bench --bench-set "$set_" --bench-compile-mode "$compile_mode" "${rounds[@]}"
  --bench-layout "${LAYOUT:-nchw}" -q -p no:cacheprovider)
boxed "$t_bench" "${bench[@]}" -k "not compile" --benchmark-json=/tmp/ptl_bench_main.json \
  > "$out/bench.log" 2>&1
echo "bench: exit $? after $((SECONDS - start)) s ($(tail -1 "$out/bench.log"))"
boxed "$t_compile" "${bench[@]}" -k compile --benchmark-json=/tmp/ptl_bench_compile.json \
  >> "$out/bench.log" 2>&1
echo "bench (compile rows): exit $? after $((SECONDS - start)) s ($(tail -1 "$out/bench.log"))"
parts=()
for f in /tmp/ptl_bench_main.json /tmp/ptl_bench_compile.json; do [[ -s $f ]] && parts+=("$f"); done
if ((${#parts[@]})); then
  (cd bench && python3 report.py --merge "$out/bench.json" "${parts[@]}") && sed -n '1,200p' "$out/bench.md"
fi
echo "gpu_check: done after $((SECONDS - start)) s"
