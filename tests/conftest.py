"""Without a GPU, the Triton kernels run in Triton's CPU interpreter, so that CI tests them.

This must happen before triton is imported (ptl_fused imports it), hence here.
Every test that runs on a CUDA device is marked `gpu` (here for the device="cuda"
parametrisations; tests/test_gpu.py marks itself), so that a short GPU session can run just
those: `pytest tests -m gpu` (scripts/gpu_check.sh).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device (skipped, with the reason, without one)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)
