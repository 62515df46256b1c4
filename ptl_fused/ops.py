"""The functional BConv-Cell ops: one contract (DESIGN.md §4), dispatched to a backend.

Shapes: x (B, Cin, H, W); weight (4·Cout, Cin, k, k) (v2: (4·Cout, 2·Cin, k, k));
bias (4·Cout,) or None; weight_rec (Cout, Cin, k, k); bias_rec (Cin,) or None;
c_prev, h_prev (B, Cout, Ho, Wo) in float32 (float64 for float64 inputs).
Every backend returns the same outputs and gradients as python_ref within the tolerances
of tests/tolerances.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from python_ref import state_dtype

from . import backends
from ._validate import check_cell_inputs, check_v2_inputs


def bconv_cell(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_prev: Tensor,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """BConv-Cell: returns (y (B, Cout, Ho, Wo) in the compute dtype, c_new (like c_prev)).

    Gradients flow to x, weight, bias and c_prev.
    """
    check_cell_inputs(x, weight, bias, c_prev, stride, padding)
    impl = backends.resolve(backend, x.device)
    return impl.bconv_cell(x, weight, bias, c_prev, stride, padding)


def bconv_cell_v2(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_rec: Tensor,
    bias_rec: Tensor | None,
    c_prev: Tensor,
    h_prev: Tensor,
    h_alpha: float | Tensor,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """BConv-Cell-v2: returns (y, c_new, h_new), h_new = h_prev + h_alpha·(y − h_prev).

    h_alpha is a float or a 0-dim tensor (a tensor keeps torch.compile from recompiling as
    it changes); it gets no gradient. Gradients flow to every other tensor input.
    """
    cout, ho, wo = check_cell_inputs(x, weight, bias, c_prev, stride, padding, v2=True)
    check_v2_inputs(x, weight, weight_rec, bias_rec, h_prev, h_alpha, (x.shape[0], cout, ho, wo))
    impl = backends.resolve(backend, x.device)
    if impl.name != "reference":
        h_alpha = torch.as_tensor(h_alpha, dtype=state_dtype(x.dtype), device=x.device).reshape(())
    return impl.bconv_cell_v2(x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding)
