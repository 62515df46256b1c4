"""The compiled extension: built, its kernels registered, and a clear fallback without it."""

from __future__ import annotations

import os
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


def _import_with(prelude: str) -> subprocess.CompletedProcess:
    code = (
        prelude
        + "\nimport warnings, torch\nwarnings.simplefilter('default')\nimport ptl_fused\n"
        + "x = torch.randn(1, 2, 4, 4); w = torch.randn(8, 2, 3, 3); c = torch.zeros(1, 2, 4, 4)\n"
        + "print(ptl_fused.available_backends())\n"
        + "print(ptl_fused.ops.bconv_cell(x, w, None, c, 1, 1)[0].shape)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_missing_extension_warns_and_reference_works():
    r = _import_with("import sys; sys.modules['ptl_fused._C'] = None")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("could not be loaded") == 1, r.stderr
    assert "'reference'" in r.stdout and "'cpu'" not in r.stdout, r.stdout
    assert "torch.Size([1, 2, 4, 4])" in r.stdout


def test_extension_built_for_another_torch_warns():
    r = _import_with("import torch; torch.__version__ = '0.0.1'")
    assert r.returncode == 0, r.stderr
    assert "built against torch" in r.stderr and "0.0.1 is installed" in r.stderr, r.stderr
    assert "'reference'" in r.stdout and "'cpu'" not in r.stdout, r.stdout
