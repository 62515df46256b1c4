"""The one tolerance rule of the test suite.

A backend's result in dtype d is compared with python_ref in float64 (the oracle), and so is
eager python_ref run in d itself. The backend passes when

    err(backend, d) <= 2 * err(eager python_ref, d) + ATOL[d]

with err the max absolute difference relative to max(1, max |oracle|) (float32 on a GPU:
ATOL_TF32 instead of ATOL, for TF32 tensor cores). So a backend may be
as inexact as PyTorch itself in that dtype, twice over, plus a small floor for the few
places where its rounding legitimately differs (fused fp32 math on bf16/fp16 data).
"""

from __future__ import annotations

import torch
from torch import Tensor

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
}


# On a GPU, float32 convolutions and matmuls may run on TF32 tensor cores (cuDNN's default
# and the Triton kernels' choice), whose 10-bit mantissa sets this floor instead.
ATOL_TF32 = 2e-3


def rel_err(got: Tensor, oracle: Tensor) -> float:
    oracle = oracle.detach().double().cpu()
    diff = (got.detach().double().cpu() - oracle).abs().max()
    return (diff / oracle.abs().max().clamp_min(1.0)).item()


def assert_matches_oracle(what: str, got: Tensor, eager: Tensor, oracle: Tensor, dtype: torch.dtype) -> None:
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    e_got, e_eager = rel_err(got, oracle), rel_err(eager, oracle)
    floor = ATOL_TF32 if dtype == torch.float32 and got.device.type == "cuda" else ATOL[dtype]
    bound = 2 * e_eager + floor
    assert e_got <= bound, f"{what} ({dtype}): error {e_got:.3e} > bound {bound:.3e} (eager {e_eager:.3e})"
