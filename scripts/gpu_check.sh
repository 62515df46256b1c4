#!/usr/bin/env bash
# One call on a GPU machine: build against the installed torch (no registry needed), run the
# GPU tests, then the benchmark, writing everything to one folder.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu_results/)
#
# Sized for a lent session (15 device minutes in all, 10 per command): one deadline, TOTAL_S
# seconds (default 560) from the start; the build and the tests have time boxes of their own
# (BUILD_S 170, TESTS_S 180, cut to leave the benchmark BENCH_MIN_S 150), and the benchmark
# gets what they leave: 60% for the rows beside eager,
# the rest for the torch.compile rows (compiling is the slow part). What finished comes back
# even when a stage runs out of time: pytest stops on the box's SIGINT and writes its summary
# and the JSON of the rows done (bench/conftest.py drops a row cut short). The two JSON parts
# are written into the output folder and, once merged into bench.json, removed.
# FULL=1: every test and `--bench-set all` with max-autotune, no time boxes (a longer
# session). LAYOUT=channels_last: the benchmark's tensors (and network) in channels_last.
# RECOMPUTE=1: the recomputing fwd+bwd rows (<backend>+recompute, eager+checkpoint) too; they
# are left out of a boxed run, whose minutes go to the rows the CUDA issue's targets judge.
# While nvcc builds, the benchmark's Triton kernels are compiled in parallel processes
# (WARM_S 100, WARM_PROCS 6; its summary line goes into env.txt).
# PTL_FUSED_COMMIT=<hash>: recorded in the results (the device gets no .git).
# Files written (at most 8 come back from a device call): env.txt build.log tests.log
# bench.log bench.json bench.md bench.png (or, if the merge fails, the two parts).
set -uo pipefail
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
full=${FULL:-0}
box() { if [[ $full == 1 ]]; then echo 0; else echo "$1"; fi; }  # timeout 0: none
# SIGINT first: pytest then stops its xdist workers and still writes its summary and the
# benchmark JSON of the rows done so far; KILL 15 s later if anything lingers.
boxed() { timeout -s INT -k 15 "$@"; }
start=$SECONDS
total=${TOTAL_S:-560}
left() { echo $((total - (SECONDS - start))); }  # seconds to the deadline
at_least_1() { echo $(($1 > 1 ? $1 : 1)); }      # timeout 0 would mean no time box at all
# The build and the tests get their own boxes, cut short where they would leave the benchmark
# less than BENCH_MIN_S seconds of the deadline.
bench_min=${BENCH_MIN_S:-150}
capped() { at_least_1 $(($1 < $(left) - bench_min ? $1 : $(left) - bench_min)); }
t_build=$(box "$(capped "${BUILD_S:-170}")")

export PYTHONUNBUFFERED=1

# What the machine is, written first: it comes back even when a later step gives up.
{
  nvidia-smi
  python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)"
  echo "commit ${PTL_FUSED_COMMIT:-unknown}"
} > "$out/env.txt" 2>&1
if ! python3 -c "import pytest, pytest_benchmark" 2>/dev/null; then
  wheels=../shared/gpu-wheels
  [[ -d $wheels ]] || wheels=shared/gpu-wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/ptl_site "$wheels"/*.whl || {
    echo "gpu_check: no pytest/pytest-benchmark here and no wheels in $wheels" | tee -a "$out/env.txt"
    exit 1
  }
  export PYTHONPATH=/tmp/ptl_site:${PYTHONPATH:-}
fi
python3 -c "import importlib.metadata as m; print('pytest-benchmark', m.version('pytest-benchmark'))" \
  >> "$out/env.txt" 2>&1
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "gpu_check: torch sees no CUDA device (env.txt)"
  exit 1
}

main_json=$out/bench_main.json compile_json=$out/bench_compile.json
rm -f "$main_json" "$compile_json"  # a warm machine's last run
set_=table compile_mode=default rounds=(--benchmark-max-time=0.15 --benchmark-min-rounds=10)
[[ $full == 1 ]] && set_=all compile_mode=max-autotune-no-cudagraphs rounds=()
bench=(python3 -m pytest bench --bench-set "$set_" --bench-compile-mode "$compile_mode" "${rounds[@]}"
  --bench-layout "${LAYOUT:-nchw}" -q -p no:cacheprovider)
main_k="not compile"
[[ $full == 1 || ${RECOMPUTE:-0} == 1 ]] || main_k+=" and not recompute and not checkpoint"

# Triton compiles a kernel for each of its autotune configs, one after another, at the first
# call of each shape: the benchmark's shapes need about 170 compiles of ~2 s, which would fill
# the benchmark's box. While nvcc builds (a few files; most cores idle), the Triton rows run
# once in parallel processes (from the source tree: the Triton backend needs no extension),
# so the benchmark finds the kernels in Triton's on-disk cache and only tunes. Boxed to WARM_S
# from its start; what it compiled before the box ends is kept.
warm_pid=
if [[ $full != 1 ]]; then
  warm_par=()
  python3 -c "import xdist" 2>/dev/null && warm_par=(-n "${WARM_PROCS:-6}")
  # timeout itself in the background (not the boxed function's subshell): $! is then its pid,
  # and a SIGINT sent to it reaches pytest.
  timeout -s INT -k 15 "$(capped "${WARM_S:-100}")" "${bench[@]}" -k "triton and ($main_k)" \
    --benchmark-disable "${warm_par[@]}" > "$out/warm.log" 2>&1 &
  warm_pid=$!
fi

export MAX_JOBS=${MAX_JOBS:-16}
# -v: on a box's timeout the log shows how far nvcc got (pip otherwise prints nothing).
boxed "$t_build" python3 -m pip install -v --no-build-isolation --no-deps -e . \
  > "$out/build.log" 2>&1 || {
  tail -60 "$out/build.log"
  [[ -n $warm_pid ]] && kill -INT "$warm_pid"
  exit 1
}
echo "build: done after $((SECONDS - start)) s"
if [[ -n $warm_pid ]]; then
  wait "$warm_pid"
  # Into env.txt: the device returns 8 files at most, and they are all spoken for.
  echo "triton warm-up: exit $? after $((SECONDS - start)) s ($(tail -1 "$out/warm.log"))" | tee -a "$out/env.txt"
  rm -f "$out/warm.log"
fi
# Every backend must be there: one missing (the extension failed to load) would drop its rows.
python3 -c "import ptl_fused; from ptl_fused import _extension as e; print('backends', ptl_fused.available_backends(), 'load error', e.LOAD_ERROR)" \
  | tee -a "$out/env.txt"
python3 -c "import ptl_fused, sys; sys.exit(not {'cuda', 'cuda_igemm', 'triton'} <= set(ptl_fused.available_backends()))" ||
  echo "gpu_check: WARNING: a GPU backend is missing, its tests skip and its rows are absent (env.txt)"

# The GPU tests (every cuda/triton/cuda_igemm parametrisation and tests/test_gpu.py; the rest
# runs in CI), in parallel processes where pytest-xdist is installed. FULL=1: every test, in
# one process (the DDP tests start process groups of their own).
# Boxed, Triton runs its first autotune config untuned (each odd test shape would compile and
# time all seven; tests/test_triton_compile.py compiles every config in CI); FULL=1 tunes.
sel=(-m gpu) par=() tune=0
python3 -c "import xdist" 2>/dev/null && par=(-n 8)
[[ $full == 1 ]] && sel=() par=() tune=1
t_tests=$(box "$(capped "${TESTS_S:-180}")")
# Inductor starts min(32, cores) compile workers per process: 8 xdist workers would start 128.
PTL_FUSED_TRITON_AUTOTUNE=$tune TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} \
  boxed "$t_tests" python3 -m pytest tests "${sel[@]}" "${par[@]}" -q -ra --durations=15 -p no:cacheprovider \
  > "$out/tests.log" 2>&1
echo "tests: exit $? after $((SECONDS - start)) s ($(tail -1 "$out/tests.log"))"

# The benchmark: the backends beside eager first, then the compile rows, merged.
margin=20  # for the merge and the report
t_bench=$(box "$(at_least_1 $((($(left) - margin) * 6 / 10)))")
boxed "$t_bench" "${bench[@]}" -k "$main_k" --benchmark-json="$main_json" \
  > "$out/bench.log" 2>&1
echo "bench: exit $? after $((SECONDS - start)) s ($(tail -1 "$out/bench.log"))"
t_compile=$(box "$(at_least_1 $(($(left) - margin)))")
boxed "$t_compile" "${bench[@]}" -k compile --benchmark-json="$compile_json" \
  >> "$out/bench.log" 2>&1
echo "bench (compile rows): exit $? after $((SECONDS - start)) s ($(tail -1 "$out/bench.log"))"
rm -f "${main_json%.json}".{md,png} "${compile_json%.json}".{md,png}  # the parts' own reports
parts=()
for f in "$main_json" "$compile_json"; do [[ -s $f ]] && parts+=("$f"); done
if ((${#parts[@]})) && (cd bench && python3 report.py --merge "$out/bench.json" "${parts[@]}"); then
  rm -f "$main_json" "$compile_json"  # in bench.json now; the device returns 8 files at most
  cat "$out/bench.md"  # its verdict sections last: the end of the output shows them
fi
echo "gpu_check: done after $((SECONDS - start)) s"
