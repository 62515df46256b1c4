"""Interleaved A/B of the CPU forward against eager python_ref and its two parts (the
convolution and the pointwise tail), a cross-check of pytest-benchmark's sequential rounds
on a noisy machine. Run: python scripts/ab_cpu_forward.py  (fastest of 9 alternating rounds, ms)
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import python_ref
from ptl_fused import ops
from python_ref.bconv_cell import _gates_and_state

SHAPES = [(32, 128, 32, 16), (64, 64, 32, 32), (32, 64, 64, 32)]


def candidates(b: int, c: int, h: int, w: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(4 * c, c, 3, 3, generator=g) * 0.05
    state = torch.randn(b, c, h, w, generator=g)
    z = F.conv2d(x, weight, None, 1, 1)
    return {
        "eager": lambda: python_ref.bconv_cell(x, weight, None, state, 1, 1),
        "cpu": lambda: ops.bconv_cell(x, weight, None, state, 1, 1, backend="cpu"),
        "conv only": lambda: F.conv2d(x, weight, None, 1, 1),
        "eager pointwise only": lambda: _gates_and_state(z, state),
    }


def main() -> None:
    for shape in SHAPES:
        fns = candidates(*shape)
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.no_grad():
            for f in fns.values():
                f()
            for _ in range(9):
                for name, f in fns.items():
                    start = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - start)
        print(shape, {k: round(min(v) * 1e3, 1) for k, v in times.items()})


if __name__ == "__main__":
    main()
