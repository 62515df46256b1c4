"""The Triton backend's kernels compile for the GPU (sm_90) with Triton's real compiler.

The other tests run them in Triton's interpreter, which skips the compiler; tests/triton_aot.py
compiles every launch the ops make, ahead of time, on this machine (no GPU needed), and reads
the PTX: tensor-core instructions, shared memory, how global memory is read. It found that
Triton 3.6 (the GPU machine's) rejects an fp64 dot whose out_dtype is left at its fp32
default; the interpreter and Triton 3.8 accept it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "float16", "float32", "float64")
FORWARD_CALLS = ("v1 train", "v1 no-grad", "v2 train", "v2 no-grad", "eval v1", "eval v2")


def _gpu_env(**extra: str) -> dict[str, str]:
    """This process's environment as a GPU run has it: the kernels compiled, not interpreted."""
    drop = ("TRITON_INTERPRET", "PTL_FUSED_TRITON_AUTOTUNE")
    return {k: v for k, v in os.environ.items() if k not in drop} | extra


@pytest.fixture(scope="module")
def compiles(tmp_path_factory) -> list[dict]:
    pytest.importorskip("triton")
    env = _gpu_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compile, not reuse
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/triton_aot.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if r["error"]]
    assert not failed, "\n\n".join(
        f"{r['kernel']} [{r['variant']}] {r['config']}: {r['error']}" for r in failed[:3]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return rows


def test_every_launch_compiles_for_sm90(compiles):
    # Every kernel of every variant the ops launch, in every dtype (the fixture fails on the
    # first compile error, with the compiler's message).
    seen = {(r["kernel"], r["variant"]) for r in compiles}
    for dtype in DTYPES:
        for call in FORWARD_CALLS:
            assert ("bconv_cell_fwd_kernel", f"{dtype} {call}") in seen
        assert ("recovery_kernel", f"{dtype} v2 train") in seen
        for call in ("bwd v1", "bwd v1 dy", "bwd v2", "bwd v2 dc"):
            assert ("bconv_cell_bwd_kernel", f"{dtype} {call}") in seen


def test_bf16_compiles_under_every_autotune_config(compiles):
    # The GPU autotunes bf16 (the benchmark dtype) over every config: each must compile and fit
    # in a Hopper block's shared memory (the script reports a config that does not as failed).
    for kernel, calls in (("bconv_cell_fwd_kernel", FORWARD_CALLS), ("recovery_kernel", ("v2 train",))):
        for call in calls:
            rows = [r for r in compiles if r["kernel"] == kernel and r["variant"] == f"bfloat16 {call}"]
            assert rows and len({r["config"] for r in rows}) == rows[0]["configs"] > 1, (kernel, call)


def test_channels_last_reads_a_by_16_byte_copies(compiles):
    # Tap-major K (channels_last, Cin % 64 == 0): the A tile's channels are contiguous, so the
    # compiler fetches them with 16-byte async copies into shared memory; channel-major (NCHW:
    # the same kernel for 16 or 64 channels) gathers them with 2-byte loads into registers.
    def row(variant, config=None):
        rows = [r for r in compiles if r["kernel"] == "bconv_cell_fwd_kernel" and r["variant"] == variant]
        return next(r for r in rows if config in (None, r["config"]))

    for call in ("v1 train", "v1 no-grad", "v2 train", "eval v1"):
        cl = row(f"bfloat16 channels_last {call}")  # the first config; the same one for NCHW
        nchw, nhwc = row(f"bfloat16 {call}", cl["config"])["reads"], cl["reads"]
        assert nchw.get("ld.global.b16", 0) > 0 and "ld.global.b16" not in nhwc, (call, nchw, nhwc)
        assert nhwc["cp.async.16"] > nchw["cp.async.16"], (call, nchw, nhwc)


def test_tensor_cores_on_sm90(compiles):
    # The gate and recovery GEMMs of bf16/fp16/fp32 (tf32) run on Hopper's wgmma; fp64 on the
    # fp64 mma.sync. A dot that silently fell back to FMAs would fail here.
    for r in compiles:
        if r["kernel"] == "bconv_cell_bwd_kernel":
            assert r["mma"] is None
        else:
            expected = "mma" if r["variant"].startswith("float64") else "wgmma"
            assert r["mma"] == expected, (r["kernel"], r["variant"], r["config"])


@pytest.mark.parametrize(("setting", "expected"), [({}, 7), ({"PTL_FUSED_TRITON_AUTOTUNE": "0"}, 1)])
def test_autotune_switch(setting, expected):
    # GPU test runs (scripts/gpu_check.sh) take the first config untuned; the default tunes.
    pytest.importorskip("triton")
    code = "from ptl_fused.triton import forward; print(len(forward._configs()))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=_gpu_env(**setting), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == expected


def test_batch_size_changes_do_not_recompile():
    # Triton's launcher compiles again for an int argument equal to 1 or newly 16-divisible:
    # before the batch-derived arguments were unspecialised, batches 1, 16 and 17 (a last
    # batch) each compiled (and autotuned) every forward kernel anew.
    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/triton_aot.py"), "--batch-specialisations"],
        env=_gpu_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {
        "bconv_cell_fwd_kernel",
        "recovery_kernel",
        "bconv_cell_bwd_kernel",
    }
    assert any(r["variant"].endswith("bwd v1 5 channels") for r in rows)
    recompiled = [r for r in rows if r["compiles"] != 1]
    assert not recompiled, recompiled[:3]
