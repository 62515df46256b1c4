"""Input checks shared by every backend: a clear error naming the argument, before any work."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from python_ref import conv_output_size, state_dtype


def few(items: Sequence[object], n: int = 5) -> str:
    """The first n of `items` for an error message, and how many there are in all when more."""
    if not items:
        return "none"
    return ", ".join(map(str, items[:n])) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _same_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _same_dtype(name: str, t: Tensor, weight: Tensor) -> None:
    # Under autocast every parameter stays in its own (float32) dtype, so they still agree.
    if t.dtype != weight.dtype:
        raise TypeError(
            f"{name} is {t.dtype} but weight is {weight.dtype}; the parameters must share one dtype"
        )


def check_int(name: str, v: object, low: int, kind: type = numbers.Integral) -> int:
    """v as a Python int >= low; kind=int refuses numpy integers (the ops' stride and padding)."""
    if isinstance(v, bool) or not isinstance(v, kind) or v < low:
        # The ops' int arguments go through torch.library's schema, which takes Python ints only.
        what = "a Python int" if isinstance(v, numbers.Integral) and not isinstance(v, kind) else "an int"
        raise ValueError(f"{name} must be {what} >= {low}, got {v!r} ({type(v).__name__})")
    return int(v)


def output_size(h: int, w: int, k: int, stride: int, padding: int) -> tuple[int, int]:
    """(Ho, Wo) of a k x k convolution of an h x w input; an error where it has no pixel."""
    ho, wo = conv_output_size(h, k, stride, padding), conv_output_size(w, k, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"x's spatial size {h}x{w} is too small for kernel_size={k} with padding={padding}")
    return ho, wo


def check_recompute(recompute: object) -> None:
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {recompute!r}")


def check_cell_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_prev: Tensor | None,
    stride: int,
    padding: int,
    *,
    v2: bool = False,
) -> tuple[int, int, int]:
    """Checks x, weight, bias, c_prev (None: the zero state), stride, padding; returns (Cout, Ho, Wo)."""
    x, weight = _tensor("x", x), _tensor("weight", weight)
    check_int("stride", stride, 1, int)
    check_int("padding", padding, 0, int)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, Cin, H, W), got shape {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    b, cin, h, w = x.shape
    if cin == 0:
        raise ValueError(f"x has no channels: shape {_shape(x)}")
    in_ch = 2 * cin if v2 else cin
    expected_w = f"(4*Cout, {in_ch}, k, k)"
    if weight.dim() != 4 or weight.shape[0] % 4 or weight.shape[0] == 0 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be {expected_w} with square k, got shape {_shape(weight)}")
    if weight.shape[1] != in_ch:
        what = "2*Cin for v2's [x, X~]" if v2 else "Cin"
        raise ValueError(
            f"weight has {weight.shape[1]} input channels but x has Cin={cin} "
            f"(expected {what}: weight {expected_w}), got weight shape {_shape(weight)}"
        )
    _same_device("weight", weight, x)
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"weight is {weight.dtype} but x is {x.dtype}; use one dtype (or autocast)")
    cout, k = weight.shape[0] // 4, weight.shape[2]
    if bias is not None:
        _tensor("bias", bias)
        if _shape(bias) != (4 * cout,):
            raise ValueError(
                f"bias must have shape (4*Cout,) = ({4 * cout},) for weight {_shape(weight)} "
                f"(Cout = {cout}), got {_shape(bias)}"
            )
        _same_device("bias", bias, x)
        _same_dtype("bias", bias, weight)
    ho, wo = output_size(h, w, k, stride, padding)
    if c_prev is not None:
        check_state("c_prev", c_prev, x, (b, cout, ho, wo))
    return cout, ho, wo


def check_state(name: str, s: Tensor, x: Tensor, shape: tuple[int, ...]) -> None:
    """A state tensor must be (B, Cout, Ho, Wo) in the state dtype, on x's device."""
    _tensor(name, s)
    if _shape(s) != shape:
        raise ValueError(f"{name} must have shape (B, Cout, Ho, Wo) = {shape}, got {_shape(s)}")
    _same_device(name, s, x)
    want = state_dtype(x.dtype)
    if s.dtype != want:
        raise TypeError(
            f"{name} must be {want} (the state is kept in float32, float64 for float64 cells), got {s.dtype}"
        )


def check_v2_inputs(
    x: Tensor,
    weight: Tensor,
    weight_rec: Tensor,
    bias_rec: Tensor | None,
    h_prev: Tensor | None,
    h_alpha: float | Tensor,
    c_shape: tuple[int, ...],
) -> None:
    """Checks v2's recovery weight/bias, h_prev (None: the zero state) and h_alpha.

    Runs after check_cell_inputs."""
    _tensor("weight_rec", weight_rec)
    cin, cout, k = x.shape[1], c_shape[1], weight.shape[2]
    if _shape(weight_rec) != (cout, cin, k, k):
        raise ValueError(
            f"weight_rec must have shape (Cout, Cin, k, k) = {(cout, cin, k, k)}, got {_shape(weight_rec)}"
        )
    _same_device("weight_rec", weight_rec, x)
    _same_dtype("weight_rec", weight_rec, weight)
    if bias_rec is not None:
        _tensor("bias_rec", bias_rec)
        if _shape(bias_rec) != (cin,):
            raise ValueError(f"bias_rec must have shape ({cin},) = (Cin,), got {_shape(bias_rec)}")
        _same_device("bias_rec", bias_rec, x)
        _same_dtype("bias_rec", bias_rec, weight)
    if h_prev is not None:
        check_state("h_prev", h_prev, x, c_shape)
    if isinstance(h_alpha, Tensor):
        if h_alpha.numel() != 1 or not h_alpha.is_floating_point():
            raise ValueError(f"h_alpha must be a float or a one-element float tensor, got {h_alpha!r}")
        _same_device("h_alpha", h_alpha, x)
    elif isinstance(h_alpha, bool) or not isinstance(h_alpha, numbers.Real):
        raise TypeError(
            f"h_alpha must be a float or a one-element float tensor, got {type(h_alpha).__name__}"
        )


def check_eval_inputs(
    x: Tensor,
    weight3: Tensor,
    bias3: Tensor | None,
    gate_map: Tensor | None,
    stride: int,
    padding: int,
) -> None:
    """Checks the prepared parameters of the eval shortcut (ptl_fused.ops.bconv_cell_eval)."""
    x, weight3 = _tensor("x", x), _tensor("weight3", weight3)
    check_int("stride", stride, 1, int)
    check_int("padding", padding, 0, int)
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a 4-D (B, Cin, H, W) floating-point tensor, got {x.dtype} {_shape(x)}")
    if (
        weight3.dim() != 4
        or weight3.shape[0] % 3
        or weight3.shape[1] != x.shape[1]
        or weight3.shape[2] != weight3.shape[3]
    ):
        raise ValueError(
            f"weight3 must be (3*Cout, {x.shape[1]}, k, k) with square k (gates i, o, g), "
            f"got {_shape(weight3)}"
        )
    _same_device("weight3", weight3, x)
    if weight3.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"weight3 is {weight3.dtype} but x is {x.dtype}; use one dtype (or autocast)")
    k = weight3.shape[-1]
    ho, wo = output_size(*x.shape[-2:], k, stride, padding)
    if bias3 is not None:
        if _shape(_tensor("bias3", bias3)) != (weight3.shape[0],):
            raise ValueError(f"bias3 must have shape ({weight3.shape[0]},), got {_shape(bias3)}")
        _same_device("bias3", bias3, x)
        _same_dtype("bias3", bias3, weight3)
    if gate_map is not None:
        if _shape(_tensor("gate_map", gate_map)) != (weight3.shape[0], ho, wo):
            raise ValueError(
                f"gate_map must have shape (3*Cout, Ho, Wo) = {(weight3.shape[0], ho, wo)}, "
                f"got {_shape(gate_map)}"
            )
        _same_device("gate_map", gate_map, x)
