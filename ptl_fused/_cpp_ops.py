"""Fake kernels and autograd for the C++ ops (schemas: csrc/bconv_cell.cpp).

The forward op returns, beside (y, C_b[, H_b]), the tensors its backward needs: the
activated gates (backend cpu/cuda: written over the convolution's output; cuda_igemm: by the
fused kernel; (0,) and written nowhere with save_gates=False) and, for v2, the recovered X~
(autograd: ptl_fused/_autograd.py). The eval op has no autograd: ptl_fused.ops only calls
it when no input needs a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from python_ref import conv_output_size

from ._autograd import cell_backward, cell_v2_backward, saves_gates, setup_cell, setup_cell_v2

ops = torch.ops.ptl_fused


def _out_hw(x: Tensor, k: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple(conv_output_size(n, k, stride, padding) for n in x.shape[-2:])


def _empty(shape, like: Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def _fake_fwd_outputs(x, weight, c_prev, stride, padding, save_gates):
    fmt = suggest_memory_format(x)
    b, cout4 = x.shape[0], weight.shape[0]
    hw = _out_hw(x, weight.shape[-1], stride, padding)
    y = _empty((b, cout4 // 4, *hw), x, x.dtype, fmt)
    c_new = _empty((b, cout4 // 4, *hw), x, c_prev.dtype, fmt)
    gates = _empty((b, cout4, *hw), x, x.dtype, fmt) if save_gates else x.new_empty(0)
    return y, c_new, gates, fmt


@torch.library.register_fake("ptl_fused::bconv_cell_fwd")
def _(x, weight, bias, c_prev, stride, padding, fused_gemm=False, save_gates=True):
    y, c_new, gates, _ = _fake_fwd_outputs(x, weight, c_prev, stride, padding, save_gates)
    return y, c_new, gates


@torch.library.register_fake("ptl_fused::bconv_cell_v2_fwd")
def _(
    x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding,
    fused_gemm=False, save_gates=True,
):  # fmt: skip
    y, c_new, gates, fmt = _fake_fwd_outputs(x, weight, c_prev, stride, padding, save_gates)
    return y, c_new, torch.empty_like(c_new), gates, _empty(x.shape, x, x.dtype, fmt)


def _fake_bwd(c_prev, gates):
    fmt = suggest_memory_format(gates)
    return _empty(gates.shape, gates, gates.dtype, fmt), _empty(c_prev.shape, c_prev, c_prev.dtype, fmt)


@torch.library.register_fake("ptl_fused::bconv_cell_bwd")
def _(grad_y, grad_c_new, c_prev, gates):
    return _fake_bwd(c_prev, gates)


@torch.library.register_fake("ptl_fused::bconv_cell_v2_bwd")
def _(grad_y, grad_c_new, grad_h_new, c_prev, gates, h_alpha):
    grad_z, grad_c_prev = _fake_bwd(c_prev, gates)
    return grad_z, grad_c_prev, torch.empty_like(grad_c_prev)


@torch.library.register_fake("ptl_fused::bconv_cell_eval")
def _(x, weight3, bias3, gate_map, stride, padding, fused_gemm=False):
    hw = _out_hw(x, weight3.shape[-1], stride, padding)
    return _empty((x.shape[0], weight3.shape[0] // 3, *hw), x, x.dtype, suggest_memory_format(x))


torch.library.register_autograd(
    "ptl_fused::bconv_cell_fwd",
    cell_backward(ops.bconv_cell_bwd, ops.bconv_cell_fwd),
    setup_context=setup_cell,
)
torch.library.register_autograd(
    "ptl_fused::bconv_cell_v2_fwd",
    cell_v2_backward(ops.bconv_cell_v2_bwd, ops.bconv_cell_v2_fwd),
    setup_context=setup_cell_v2,
)


# fused_gemm=True: the CUDA implicit-GEMM kernel (convolution + cell in one kernel) instead of
# the ATen convolution + fused epilogue; backward is the same either way. The gates are saved
# only for a backward that does not recompute them (recompute: ptl_fused/_autograd.py).
def bconv_cell(x, weight, bias, c_prev, stride, padding, fused_gemm=False, recompute=False):
    save = saves_gates(recompute, x, weight, bias, c_prev)
    y, c_new, _ = ops.bconv_cell_fwd(x, weight, bias, c_prev, stride, padding, fused_gemm, save)
    return y, c_new


def bconv_cell_v2(
    x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding,
    fused_gemm=False, recompute=False,
):  # fmt: skip
    save = saves_gates(recompute, x, weight, bias, weight_rec, bias_rec, c_prev, h_prev)
    y, c_new, h_new, _, _ = ops.bconv_cell_v2_fwd(
        x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding,
        fused_gemm, save,
    )  # fmt: skip
    return y, c_new, h_new


def bconv_cell_eval(x, weight3, bias3, gate_map, stride, padding, fused_gemm=False):
    return ops.bconv_cell_eval(x, weight3, bias3, gate_map, stride, padding, fused_gemm)
