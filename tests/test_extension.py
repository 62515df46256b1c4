"""The compiled extension: built, its kernels registered, and a clear fallback without it."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import ptl_fused
from ptl_fused import _extension

OPS = ["bconv_cell_fwd", "bconv_cell_bwd", "bconv_cell_v2_fwd", "bconv_cell_v2_bwd", "bconv_cell_eval"]


def test_extension_is_built_and_loaded():
    assert _extension.LOAD_ERROR is None, _extension.LOAD_ERROR
    assert "cpu" in ptl_fused.available_backends()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_is_available_where_triton_is():
    # Every Triton test skips, with a reason, where the backend is unavailable: a broken import
    # or interpreter would turn them all into green skips. Here (TRITON_INTERPRET=1 on the CPU,
    # tests/conftest.py) or on a GPU it must be available.
    from ptl_fused.backends import BACKENDS

    assert "triton" in ptl_fused.available_backends(), BACKENDS["triton"].unavailable()


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ptl_fused::{op}", "CPU")


@pytest.mark.skipif(
    os.environ.get("PTL_FUSED_WITH_CUDA") == "0", reason="the build was asked for no CUDA kernels"
)
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    # CI builds WITH_CUDA on a GPU-less machine: this is what shows the CUDA code compiled.
    assert _extension.WITH_CUDA, "ptl_fused._C was built without CUDA (torch without CUDA, or no nvcc)"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ptl_fused::{op}", "CUDA")


def _import_code() -> str:
    return (
        "import warnings, torch\nwarnings.simplefilter('default')\nimport ptl_fused\n"
        + "x = torch.randn(1, 2, 4, 4); w = torch.randn(8, 2, 3, 3); c = torch.zeros(1, 2, 4, 4)\n"
        + "print(ptl_fused.available_backends())\n"
        + "print(ptl_fused.ops.bconv_cell(x, w, None, c, 1, 1)[0].shape)\n"
    )


def _import_with(prelude: str) -> subprocess.CompletedProcess:
    code = prelude + "\n" + _import_code()
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _source_tree_without_library(tmp_path) -> dict:
    """ptl_fused and python_ref copied without the compiled library: the environment that
    imports them (an editable install's finder, which would still find the real one, is
    taken out of sys.meta_path by the code run)."""
    from pathlib import Path

    root = Path(ptl_fused.__file__).parents[1]
    for pkg in ("ptl_fused", "python_ref"):
        shutil.copytree(root / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


_NO_EDITABLE = "import sys; sys.meta_path = [f for f in sys.meta_path if '__editable__' not in str(f)]"


@pytest.mark.parametrize(
    ("library", "message"),
    [(None, "ptl_fused._C is not built"), (b"not an ELF file", "ptl_fused._C could not be loaded")],
    ids=["unbuilt", "broken"],
)
def test_missing_extension_warns_once_and_reference_works(tmp_path, library, message):
    # Not built (pip install never ran): the warning says so, not Python's own message for
    # the missing name, which blames a circular import. Broken: it says why it failed.
    env = _source_tree_without_library(tmp_path)
    if library is not None:
        (tmp_path / "ptl_fused" / _extension.C.__file__.rsplit("/", 1)[-1]).write_bytes(library)
    r = subprocess.run(
        [sys.executable, "-c", _NO_EDITABLE + "\n" + _import_code()],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(message) == 1 and "circular" not in r.stderr, r.stderr
    assert "'reference'" in r.stdout and "'cpu'" not in r.stdout, r.stdout
    assert "torch.Size([1, 2, 4, 4])" in r.stdout


def test_extension_built_for_another_torch_warns():
    r = _import_with("import torch; torch.__version__ = '0.0.1'")
    assert r.returncode == 0, r.stderr
    assert "built against torch" in r.stderr and "0.0.1 is installed" in r.stderr, r.stderr
    assert "'reference'" in r.stdout and "'cpu'" not in r.stdout, r.stdout


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None,
    reason="needs an x86-64 build and binutils' objdump",
)
def test_code_outside_the_avx_builds_runs_on_any_x86_64():
    # An inline function of a shared header is emitted by every file that uses it, and the
    # linker keeps one copy for all callers: if it is the copy from cell_rows_avx2.cpp, the
    # portable path runs AVX code (an illegal instruction on a CPU without it). The portable
    # and dispatching code never touches a 256- or 512-bit register; only the AVX2/AVX512
    # namespaces (ours and at::vec's) may.
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", _extension.C.__file__],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    wide, fn = set(), ""
    for line in dump.splitlines():
        if line.endswith(">:"):
            fn = line.split("<", 1)[1][:-2]
        elif ("%ymm" in line or "%zmm" in line) and not re.search(r"::AVX(2|512)::", fn):
            wide.add(fn)
    assert not wide, f"functions outside the AVX builds use AVX registers: {sorted(wide)}"
