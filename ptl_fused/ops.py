"""The functional BConv-Cell ops: one contract (DESIGN.md §4), dispatched to a backend.

Shapes: x (B, Cin, H, W); weight (4·Cout, Cin, k, k) (v2: (4·Cout, 2·Cin, k, k));
bias (4·Cout,) or None; weight_rec (Cout, Cin, k, k); bias_rec (Cin,) or None;
c_prev, h_prev (B, Cout, Ho, Wo) in float32 (float64 for float64 inputs), or None for the
zero state of inference (DESIGN.md §5): then only the i, o, g gates are computed, no state
is read and none is returned.
Every backend returns the same outputs and gradients as python_ref within the tolerances
of tests/tolerances.py.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import TransformType, get_interpreter_stack

from python_ref import eval_gate_rows, state_dtype

from . import backends
from ._autograd import needs_grad
from ._validate import check_cell_inputs, check_eval_inputs, check_recompute, check_v2_inputs


def exporting() -> bool:
    """True while torch.export / torch.onnx.export trace the model: the cells then emit the
    reference's plain ATen ops, which every exporter understands, and inference takes the eval
    shortcut in any grad mode (those ops are differentiable; the fused eval kernels are not).

    Reads the flag torch.export sets rather than torch.compiler.is_exporting(): torch.compile's
    tracer in torch 2.11 (the GPU image's) answers that True inside every compiled function,
    which sent every compiled cell to the reference."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return (torch.compiler.is_exporting() if flag is None else flag) or torch.onnx.is_in_onnx_export()


def func_transforms() -> list:
    """The torch.func transforms (grad, vmap, jvp, ...) this call runs under, outermost first;
    none while torch.compile traces (its graphs use no such transform)."""
    if torch.compiler.is_compiling():
        return []
    return get_interpreter_stack() or []


def _differentiated_forward(tensors: tuple[Tensor | None, ...]) -> bool:
    """True under forward-mode AD (a tensor carries a tangent: torch.func.jvp/jacfwd,
    forward_ad dual tensors) or a torch.func grad transform (grad, vjp, jacrev). The fused
    ops have no jvp and no functorch rules; python_ref, plain PyTorch ops, has both."""
    if torch.compiler.is_compiling():
        return False
    if any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in func_transforms()):
        return True
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _resolve(backend: str, x: Tensor, *tensors: Tensor | None) -> tuple[backends.Backend, bool]:
    """(the backend to run, whether it is the chosen one): the reference instead while exporting,
    on meta tensors (shapes only: the reference's plain ops have meta kernels) or under forward
    AD / torch.func transforms (same values, the gradients those need; plain ops, so no
    recomputation either)."""
    # Before resolving: a model built for backend="cuda" exports, or runs on meta, on a CPU machine.
    if exporting() or x.device.type == "meta":
        return backends.BACKENDS["reference"], False
    impl = backends.resolve(backend, x.device)
    if _differentiated_forward((x, *tensors)):
        return backends.BACKENDS["reference"], False
    return impl, True


def bconv_cell(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_prev: Tensor | None,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
    recompute: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """BConv-Cell: returns (y (B, Cout, Ho, Wo) in the compute dtype, c_new (like c_prev)).

    x (B, Cin, H, W); weight (4·Cout, Cin, k, k), gates ordered input, forget, output, cell;
    bias (4·Cout) or None; c_prev (B, Cout, Ho, Wo), float32 for bf16/fp16 x (else x's dtype),
    or None; Ho = (H + 2·padding − k) // stride + 1, Wo likewise.
    Gradients flow to x, weight, bias and c_prev. c_prev=None is inference from the zero
    state: returns (y, None) through the eval shortcut, or, when a gradient is needed,
    through the full cell from an explicit zero state (the shortcut has no backward).
    recompute=True keeps no gates for backward, which computes them again from x, weight and
    c_prev: one more gate convolution for (B, 4·Cout, Ho, Wo) fewer saved values.
    """
    cout, ho, wo = check_cell_inputs(x, weight, bias, c_prev, stride, padding)
    check_recompute(recompute)
    impl, chosen = _resolve(backend, x, weight, bias, c_prev)
    run = dict(recompute=True) if recompute and chosen else {}
    if c_prev is not None:
        return impl.bconv_cell(x, weight, bias, c_prev, stride, padding, **run)
    if needs_grad(x, weight, bias) and not exporting():  # the shortcut has no backward
        c0 = x.new_zeros((x.shape[0], cout, ho, wo), dtype=state_dtype(x.dtype))
        return impl.bconv_cell(x, weight, bias, c0, stride, padding, **run)[0], None
    rows_bias = None if bias is None else eval_gate_rows(bias)
    return impl.bconv_cell_eval(x, eval_gate_rows(weight), rows_bias, None, stride, padding), None


def bconv_cell_v2(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_rec: Tensor,
    bias_rec: Tensor | None,
    c_prev: Tensor | None,
    h_prev: Tensor | None,
    h_alpha: float | Tensor,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
    recompute: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """BConv-Cell-v2: returns (y, c_new, h_new), h_new = h_prev + h_alpha·(y − h_prev).

    x (B, Cin, H, W); weight (4·Cout, 2·Cin, k, k) over [x, X̃], X̃ = conv_transpose2d(h_prev,
    weight_rec) the recovery, weight_rec (Cout, Cin, k, k); bias (4·Cout), bias_rec (Cin) or
    None; c_prev, h_prev (B, Cout, Ho, Wo) in the state dtype (as bconv_cell's c_prev), or both
    None; y (B, Cout, Ho, Wo) in the compute dtype, c_new and h_new like c_prev.
    h_alpha is a float or a one-element float tensor, read as a 0-dim scalar of the state
    dtype (a tensor keeps torch.compile from recompiling as it changes); it gets no gradient.
    Gradients flow to every other tensor input.
    c_prev=h_prev=None is inference from the zero state: returns (y, None, None), where the
    recovery's share of the gate conv is the constant map of python_ref.v2_gate_map.
    recompute=True keeps neither the gates nor X̃ for backward, which computes both again.
    """
    cout, ho, wo = check_cell_inputs(x, weight, bias, c_prev, stride, padding, v2=True)
    check_recompute(recompute)
    check_v2_inputs(x, weight, weight_rec, bias_rec, h_prev, h_alpha, (x.shape[0], cout, ho, wo))
    if (c_prev is None) != (h_prev is None):
        raise ValueError("c_prev and h_prev must both be tensors, or both None (the zero state of inference)")
    # A constant of the aggregation on every backend (no gradient, no tangent): a 0-dim tensor
    # of the state dtype, whatever one-element shape and float dtype it came in, so that h_new
    # has the state's shape and dtype on every backend; numpy scalars become floats.
    dtype = state_dtype(x.dtype)
    h_alpha = h_alpha.detach().to(dtype).reshape(()) if isinstance(h_alpha, Tensor) else float(h_alpha)
    impl, chosen = _resolve(backend, x, weight, bias, weight_rec, bias_rec, c_prev, h_prev)
    inference = c_prev is None
    if inference:
        if not needs_grad(x, weight, bias, weight_rec, bias_rec) or exporting():
            w3, b3, m = v2_eval_params(weight, bias, bias_rec, x.shape[-2:], stride, padding)
            return impl.bconv_cell_eval(x, w3, b3, m, stride, padding), None, None
        c_prev = h_prev = x.new_zeros((x.shape[0], cout, ho, wo), dtype=dtype)
    if impl.name != "reference" and not isinstance(h_alpha, Tensor):
        # The fused ops take a device scalar; torch.full copies no host value (no sync).
        h_alpha = torch.full((), h_alpha, dtype=dtype, device=x.device)
    run = dict(recompute=True) if recompute and chosen else {}
    y, c_new, h_new = impl.bconv_cell_v2(
        x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding, **run
    )
    return (y, None, None) if inference else (y, c_new, h_new)


def v2_eval_params(
    weight: Tensor, bias: Tensor | None, bias_rec: Tensor | None, size, stride: int, padding: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(weight3 (3·Cout, Cin, k, k), bias3 (3·Cout,) or None, gate_map (3·Cout, Ho, Wo) or None)
    of v2's eval shortcut: bias3 + gate_map = python_ref.v2_gate_map, at a fraction of its cost.

    X~ is bias_rec in every pixel, so its convolution is, per gate row and tap, the sum over
    channels of weight·bias_rec (one pass over the recovery columns, nothing copied), convolved
    over a plane of ones (zero padding cuts it at the borders). Without bias_rec X~ = 0: no map,
    and v2 eval is v1's on the x columns.
    """
    cin = weight.shape[1] // 2
    weight3 = eval_gate_rows(weight[:, :cin])
    bias3 = None if bias is None else eval_gate_rows(bias)
    if bias_rec is None:
        return weight3, bias3, None
    rec = weight[:, cin:]  # (4·Cout, Cin, k, k), a view; matmul reads it in place (einsum copies)
    taps = torch.matmul(bias_rec.to(weight.dtype), rec.flatten(2)).view(-1, *rec.shape[2:])
    ones = weight.new_ones(1, 1, *size)
    return weight3, None, F.conv2d(ones, eval_gate_rows(taps).unsqueeze(1), bias3, stride, padding)[0]


def bconv_cell_eval(
    x: Tensor,
    weight3: Tensor,
    bias3: Tensor | None,
    gate_map: Tensor | None,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
) -> Tensor:
    """The eval shortcut from prepared parameters, for callers that keep them between calls:
    weight3 (3·Cout, Cin, k, k) and bias3 (3·Cout,) are the i, o, g rows (python_ref.eval_gate_rows);
    gate_map (3·Cout, Ho, Wo) is v2's constant recovery share. Returns y (B, Cout, Ho, Wo).
    Forward only: for when no input needs a gradient (bconv_cell(..., c_prev=None) takes it
    then, and the full cell from zeros otherwise)."""
    check_eval_inputs(x, weight3, bias3, gate_map, stride, padding)
    if needs_grad(x, weight3, bias3, gate_map):
        raise RuntimeError(
            "bconv_cell_eval has no backward; use bconv_cell(..., c_prev=None) when a gradient is needed"
        )
    return _resolve(backend, x, weight3, bias3, gate_map)[0].bconv_cell_eval(
        x, weight3, bias3, gate_map, stride, padding
    )
