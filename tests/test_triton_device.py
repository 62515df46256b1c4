"""Every Triton launch runs under its tensors' device (CPU interpreter, any machine).

Triton launches, and autotunes, on the current CUDA device and its stream, wherever the
arguments live; ptl_fused.triton.ops makes the tensors' device current around each launch
(on_device). A test with tensors on a second GPU needs two (tests/test_gpu.py); this one checks
the wiring on the CPU: each kernel launch of every op happens inside on_device of the tensor
whose device the outputs take.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ptl_fused import ops
from ptl_fused.backends import BACKENDS

triton_why = BACKENDS["triton"].unavailable()
KERNELS = ("bconv_cell_fwd_kernel", "recovery_kernel", "bconv_cell_bwd_kernel")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels there, else the interpreter
pytestmark = [pytest.mark.skipif(triton_why is not None, reason=f"Triton: {triton_why}")]
if DEVICE == "cuda":  # real launches: part of the GPU run's `-m gpu` selection
    pytestmark.append(pytest.mark.gpu)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_every_launch_is_inside_on_device(monkeypatch, v2):
    from ptl_fused.triton import ops as tops

    guarded: list[torch.device] = []  # the devices made current, innermost last
    launches: list[tuple[str, torch.device | None]] = []
    real_on_device = tops.on_device

    @contextlib.contextmanager
    def recording_on_device(t):
        guarded.append(t.device)
        with real_on_device(t):
            yield
        guarded.pop()

    class Launcher:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, guarded[-1] if guarded else None))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(tops, "on_device", recording_on_device)
    for name in KERNELS:
        monkeypatch.setattr(tops, name, Launcher(name, getattr(tops, name)))

    def rnd(*shape, grad=False):
        return torch.randn(*shape, device=DEVICE).requires_grad_(grad)

    x, w, c = rnd(2, 3, 6, 5, grad=True), rnd(16, 6 if v2 else 3, 3, 3, grad=True), rnd(2, 4, 6, 5)
    if v2:
        wr = rnd(4, 3, 3, 3, grad=True)
        outs = ops.bconv_cell_v2(x, w, None, wr, None, c, c.clone(), 0.5, 1, 1, backend="triton")
    else:
        outs = ops.bconv_cell(x, w, None, c, 1, 1, backend="triton")
    sum(o.sum() for o in outs).backward()
    with torch.no_grad():  # the eval kernel
        ops.bconv_cell(x, w[:, :3], None, None, 1, 1, backend="triton")

    names = [n for n, _ in launches]
    want = {"bconv_cell_fwd_kernel", "bconv_cell_bwd_kernel"} | ({"recovery_kernel"} if v2 else set())
    assert set(names) == want, names
    assert all(device == x.device for _, device in launches), launches
