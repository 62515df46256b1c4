"""Fake kernels and autograd for the C++ ops (schemas: csrc/bconv_cell.cpp).

The forward op returns, beside (y, C_b[, H_b]), the tensors its backward needs: the
activated gates (written over the convolution's output, so no extra (B, 4C, Ho, Wo)
buffer) and, for v2, the recovered X~. Saved: x, weights, C_{b-1}[, H_{b-1}], gates[, X~].
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch.autograd.function import once_differentiable

from python_ref import output_padding

ops = torch.ops.ptl_fused


def _out_hw(x: Tensor, k: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((n + 2 * padding - k) // stride + 1 for n in x.shape[-2:])


def _empty(shape, like: Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def _fake_fwd_outputs(x, weight, c_prev, stride, padding):
    fmt = suggest_memory_format(x)
    b, cout4 = x.shape[0], weight.shape[0]
    hw = _out_hw(x, weight.shape[-1], stride, padding)
    y = _empty((b, cout4 // 4, *hw), x, x.dtype, fmt)
    c_new = _empty((b, cout4 // 4, *hw), x, c_prev.dtype, fmt)
    gates = _empty((b, cout4, *hw), x, x.dtype, fmt)
    return y, c_new, gates, fmt


@torch.library.register_fake("ptl_fused::bconv_cell_fwd")
def _(x, weight, bias, c_prev, stride, padding):
    y, c_new, gates, _ = _fake_fwd_outputs(x, weight, c_prev, stride, padding)
    return y, c_new, gates


@torch.library.register_fake("ptl_fused::bconv_cell_v2_fwd")
def _(x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding):
    y, c_new, gates, fmt = _fake_fwd_outputs(x, weight, c_prev, stride, padding)
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


def _conv_backward(grad_out, inp, weight, bias_size, stride, padding, mask, transposed=False, out_pad=(0, 0)):
    """ATen's convolution backward for the gradients in `mask` (input, weight, bias)."""
    if not any(mask):
        return None, None, None
    return torch.ops.aten.convolution_backward(
        grad_out,
        inp,
        weight,
        [bias_size] if mask[2] else None,
        [stride, stride],
        [padding, padding],
        [1, 1],
        transposed,
        list(out_pad),
        1,
        list(mask),
    )


def _setup_v1(ctx, inputs, output):
    x, weight, bias, c_prev, stride, padding = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, weight, c_prev, output[2])
    ctx.conv = (bias is not None, stride, padding)


@once_differentiable  # second derivatives are not implemented: a clear error, not wrong numbers
def _backward_v1(ctx, grad_y, grad_c_new, _grad_gates):
    x, weight, c_prev, gates = ctx.saved_tensors
    has_bias, stride, padding = ctx.conv
    need = ctx.needs_input_grad
    grad_z, grad_c_prev = ops.bconv_cell_bwd(grad_y, grad_c_new, c_prev, gates)
    gx, gw, gb = _conv_backward(
        grad_z, x, weight, weight.shape[0], stride, padding, (need[0], need[1], has_bias and need[2])
    )
    return gx, gw, gb, grad_c_prev if need[3] else None, None, None


def _setup_v2(ctx, inputs, output):
    x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding = inputs
    gates, x_rec = output[3], output[4]
    ctx.mark_non_differentiable(gates, x_rec)
    ctx.save_for_backward(x, weight, weight_rec, c_prev, h_prev, gates, x_rec, h_alpha)
    ctx.conv = (bias is not None, bias_rec is not None, stride, padding)


@once_differentiable
def _backward_v2(ctx, grad_y, grad_c_new, grad_h_new, _grad_gates, _grad_x_rec):
    x, weight, weight_rec, c_prev, h_prev, gates, x_rec, h_alpha = ctx.saved_tensors
    has_bias, has_bias_rec, stride, padding = ctx.conv
    n_x, n_w, n_b, n_wr, n_br, n_c, n_h = ctx.needs_input_grad[:7]
    grad_z, grad_c_prev, grad_h_prev = ops.bconv_cell_v2_bwd(
        grad_y, grad_c_new, grad_h_new, c_prev, gates, h_alpha
    )
    need_rec = n_wr or (n_br and has_bias_rec) or n_h
    cin = x.shape[1]
    g_cat, gw, gb = _conv_backward(
        grad_z,
        torch.cat([x, x_rec], dim=1),
        weight,
        weight.shape[0],
        stride,
        padding,
        (n_x or need_rec, n_w, has_bias and n_b),
    )
    gx = g_cat[:, :cin] if n_x else None
    gwr = gbr = None
    if need_rec:
        k = weight.shape[-1]
        out_pad = [output_padding(s, k, stride, padding) for s in x.shape[-2:]]
        g_h, gwr, gbr = _conv_backward(
            g_cat[:, cin:],
            h_prev.to(x.dtype),
            weight_rec,
            cin,
            stride,
            padding,
            (n_h, n_wr, has_bias_rec and n_br),
            transposed=True,
            out_pad=out_pad,
        )
        if g_h is not None:
            grad_h_prev = grad_h_prev + g_h
    return (
        gx,
        gw,
        gb,
        gwr,
        gbr,
        grad_c_prev if n_c else None,
        grad_h_prev if n_h else None,
        None,
        None,
        None,
    )


torch.library.register_autograd("ptl_fused::bconv_cell_fwd", _backward_v1, setup_context=_setup_v1)
torch.library.register_autograd("ptl_fused::bconv_cell_v2_fwd", _backward_v2, setup_context=_setup_v2)


def bconv_cell(x, weight, bias, c_prev, stride, padding):
    y, c_new, _ = ops.bconv_cell_fwd(x, weight, bias, c_prev, stride, padding)
    return y, c_new


def bconv_cell_v2(x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding):
    y, c_new, h_new, _, _ = ops.bconv_cell_v2_fwd(
        x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding
    )
    return y, c_new, h_new
