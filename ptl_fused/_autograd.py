"""Autograd shared by the fused backends (C++ cpu/cuda and Triton).

A fused forward op has the signature of ``ptl_fused::bconv_cell_fwd`` (v2:
``bconv_cell_v2_fwd``), optionally followed by more non-tensor arguments, the last of them
``save_gates``, and returns (y, c_new[, h_new], gates[, x_rec]). Backward = the backend's
fused elementwise pass (dZ for the four gates, dC_{b-1}[, dH_{b-1}'s aggregation part])
followed by ATen's convolution backward (cuDNN/oneDNN) for the inputs and weights, and for
v2 the recovery's transposed-convolution backward.

What is kept for backward (DESIGN.md §2): the activated gates (save_gates=True), or, when a
forward with a gradient to come ran with save_gates=False, only its inputs; backward then
runs the same forward op again to get the gates (and v2's X~): one more gate convolution for
(B, 4·Cout, Ho, Wo) fewer saved values (ptl_fused.ops' `recompute`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from python_ref import output_padding


def conv_backward(grad_out, inp, weight, bias_size, stride, padding, mask, transposed=False, out_pad=(0, 0)):
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


def first_order(backward: Callable) -> Callable:
    """A backward without a derivative of its own: create_graph=True (double backward, e.g. a
    gradient penalty) is refused before anything runs. once_differentiable alone would let
    the second-order terms through the weights go missing silently."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ptl_fused: the fused backends compute first-order gradients only, but this "
                "backward was asked for a graph (create_graph=True: double backward); use "
                "backend='reference' for higher-order gradients"
            )
        return once_differentiable(backward)(ctx, *grads)

    return wrapper


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a forward on these inputs has a backward to come: where not, a fused forward
    saves no gates (save_gates=False), so none are written, and ptl_fused.ops may take the
    eval shortcut, which has no backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def saves_gates(recompute: bool, *tensors: torch.Tensor | None) -> bool:
    """The fused forwards' save_gates: only for a backward to come that does not recompute them."""
    return needs_grad(*tensors) and not recompute


def _as_saved(x) -> torch.autocast:
    """Autocast off for a recompute: its inputs were saved as the first run got them (already
    cast), and a backward called under autocast would cast them again (the C++ ops' Autocast
    kernels), maybe to another dtype than the first run's."""
    return torch.autocast(x.device.type, enabled=False)


def _saved_gates(gates):
    """The gates output as backward keeps it: None when the forward saved none (recompute)."""
    return gates if gates.dim() == 4 else None


def setup_cell(ctx, inputs, output):
    x, weight, bias, c_prev, stride, padding = inputs[:6]
    # Unused outputs (the gates; usually c_new, whose carry is detached) get None, not a
    # zero-filled gradient the size of the gate tensor.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])
    gates = _saved_gates(output[2])
    ctx.save_for_backward(x, weight, c_prev, gates, bias if gates is None else None)
    ctx.conv = (bias is not None, stride, padding)
    ctx.extra = inputs[6:-1]  # the op's arguments between padding and save_gates


def cell_backward(bwd_epilogue: Callable, forward: Callable) -> Callable:
    """Backward of a v1 forward op; bwd_epilogue(gy, gc, c_prev, gates) -> (dZ, dC_prev);
    forward: the op itself, run again where its first run saved no gates."""

    @first_order
    def backward(ctx, grad_y, grad_c_new, _grad_gates):
        x, weight, c_prev, gates, bias = ctx.saved_tensors
        has_bias, stride, padding = ctx.conv
        need = ctx.needs_input_grad
        if gates is None:
            with _as_saved(x):
                gates = forward(x, weight, bias, c_prev, stride, padding, *ctx.extra, True)[2]
        grad_z, grad_c_prev = bwd_epilogue(grad_y, grad_c_new, c_prev, gates)
        gx, gw, gb = conv_backward(
            grad_z, x, weight, weight.shape[0], stride, padding, (need[0], need[1], has_bias and need[2])
        )
        return (gx, gw, gb, grad_c_prev if need[3] else None) + (None,) * (len(need) - 4)

    return backward


def setup_cell_v2(ctx, inputs, output):
    x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding = inputs[:10]
    gates, x_rec = _saved_gates(output[3]), output[4]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[3], x_rec)
    # Recomputing: the inputs alone (X~ is recomputed with the gates); else the biases are
    # not needed, and X~ is kept for the gate convolution's weight gradient.
    saved = (bias, bias_rec, None) if gates is None else (None, None, x_rec)
    ctx.save_for_backward(x, weight, weight_rec, c_prev, h_prev, gates, h_alpha, *saved)
    ctx.conv = (bias is not None, bias_rec is not None, stride, padding)
    ctx.extra = inputs[10:-1]  # the op's arguments between padding and save_gates


def cell_v2_backward(bwd_epilogue: Callable, forward: Callable) -> Callable:
    """Backward of a v2 forward op; bwd_epilogue(gy, gc, gh, c_prev, gates, h_alpha) ->
    (dZ, dC_prev, dH_prev's aggregation part); forward: the op itself, run again where its
    first run saved no gates."""

    @first_order
    def backward(ctx, grad_y, grad_c_new, grad_h_new, _grad_gates, _grad_x_rec):
        x, weight, weight_rec, c_prev, h_prev, gates, h_alpha, bias, bias_rec, x_rec = ctx.saved_tensors
        has_bias, has_bias_rec, stride, padding = ctx.conv
        need = ctx.needs_input_grad
        if gates is None:
            args = (x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding)
            with _as_saved(x):
                gates, x_rec = forward(*args, *ctx.extra, True)[3:5]
        n_x, n_w, n_b, n_wr, n_br, n_c, n_h = need[:7]
        grad_z, grad_c_prev, grad_h_prev = bwd_epilogue(
            grad_y, grad_c_new, grad_h_new, c_prev, gates, h_alpha
        )
        need_rec = n_wr or (n_br and has_bias_rec) or n_h
        cin = x.shape[1]
        g_cat, gw, gb = conv_backward(
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
            g_h, gwr, gbr = conv_backward(
                g_cat[:, cin:],
                h_prev.to(x.dtype),
                weight_rec,
                cin,
                stride,
                padding,
                (n_h, n_wr, has_bias_rec and n_br),
                transposed=True,
                out_pad=[output_padding(s, k, stride, padding) for s in x.shape[-2:]],
            )
            if g_h is not None:
                grad_h_prev = grad_h_prev + g_h
        grads = (gx, gw, gb, gwr, gbr, grad_c_prev if n_c else None, grad_h_prev if n_h else None)
        return grads + (None,) * (len(need) - 7)

    return backward
