"""The ``triton`` backend: custom ops around the Triton kernels, with fake kernels and the
shared autograd (ptl_fused/_autograd.py). Runs on CUDA tensors, and on CPU tensors in
Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported; tests only).

Backward: the fused Triton elementwise pass, then ATen's convolution backward (cuDNN) for
dx/dW/db; a Triton implicit-GEMM backward is not used until a GPU benchmark shows it wins.
v2: the recovery X~ = conv_transpose(H_{b-1}) is its own implicit-GEMM kernel
(recovery.py), whose output the gate kernel reads beside x as a second K source (no
concatenation is materialised). Fusing the recovery into the gate kernel would recompute
each X~ tile k·k times per output tile; whether that wins is for a GPU benchmark to say.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

from python_ref import conv_output_size

from .._autograd import cell_backward, cell_v2_backward, saves_gates, setup_cell, setup_cell_v2
from .backward import bconv_cell_bwd_kernel
from .forward import INTERPRET, bconv_cell_fwd_kernel
from .recovery import recovery_kernel

GPU_BWD_BLOCK = 1024
BWD_BLOCK = 256 if INTERPRET else GPU_BWD_BLOCK


@triton.jit
def _loop_probe(out_ptr, n):
    total = 0
    for _ in range(0, n, 1):
        total += 1
    tl.store(out_ptr, total)


def _probe_interpreter() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels here, or None.

    The kernels loop over runtime bounds; Triton 3.6's interpreter turns such a bound into an
    int with int(array of shape (1,)), which NumPy 2.4 refuses. Triton 3.8 runs it.
    """
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as err:  # the interpreter's own failure, whatever its type
        why = f"cannot run a loop over a runtime bound here ({err})"
        return f"Triton {triton.__version__}'s CPU interpreter {why}"
    return None if out.item() == 3 else f"Triton {triton.__version__}'s CPU interpreter miscounts a loop"


# Probed once at import, not on first use: backend resolution may run under torch.compile's
# tracing, which cannot trace a kernel launch.
_INTERPRETER_PROBLEM = _probe_interpreter() if INTERPRET else None


def interpreter_problem() -> str | None:
    """Why the interpreter cannot run the kernels (None where it can, and on a GPU)."""
    return _INTERPRETER_PROBLEM


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs use TF32 tensor cores on the GPU (tolerance: tests/tolerances.py).
    return "tf32" if dtype == torch.float32 and not INTERPRET else "ieee"


def _out_shape(x: Tensor, weight: Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    k = weight.shape[-1]
    ho, wo = (conv_output_size(n, k, stride, padding) for n in x.shape[-2:])
    return x.shape[0], weight.shape[0] // 4, ho, wo


def _outputs(x, weight, c_prev, stride, padding, save_gates, v2):
    """Empty outputs in x's layout: y, c_new, (h_new), gates ((0,) when not saved)."""
    fmt = suggest_memory_format(x)
    shape = _out_shape(x, weight, stride, padding)
    state = dict(dtype=c_prev.dtype, device=x.device, memory_format=fmt)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    gates_shape = (shape[0], 4 * shape[1], *shape[2:]) if save_gates else (0,)
    gates = torch.empty(gates_shape, dtype=x.dtype, device=x.device)
    if save_gates:
        gates = gates.contiguous(memory_format=fmt)
    outs = [y, torch.empty(shape, **state)]
    if v2:
        outs.append(torch.empty(shape, **state))
    return outs, gates, fmt


def on_device(t: Tensor):
    """Triton launches (and autotunes) on the current CUDA device and its stream, wherever the
    arguments live: make it the tensors' device, as ATen's ops and the C++ backend's guard do."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same strides where it matters: a size-1 dimension's stride is never multiplied by a
    nonzero index, and `contiguous(fmt)` leaves it as it was."""
    pairs = zip(a.shape, a.stride(), b.stride(), strict=True)
    return a.shape == b.shape and all(n == 1 or s == t for n, s, t in pairs)


def check_32bit(**tensors: Tensor | None) -> None:
    """Refuse, naming it, a tensor whose elements span 2^31 or more: the kernels compute their
    offsets in int32 (Triton types size and stride arguments below 2^31 as i32)."""
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))  # its offset
        if last >= 2**31:
            raise ValueError(
                f"ptl_fused: backend 'triton' indexes in 32 bits, but {name} {tuple(t.shape)} with strides "
                f"{t.stride()} spans 2^31 elements or more; use backend 'cuda' or a smaller batch"
            )


def _launch_fwd(
    x, x_rec, weight, bias, c_prev, h_prev, h_alpha, stride, padding, y, c_new, h_new, gates, gate_map=None
):
    """c_prev None: the eval kernel (weight = the i, o, g rows; optional (3·Cout, Ho, Wo) gate_map)."""
    check_32bit(
        x=x, x_rec=x_rec, weight=weight, c_prev=c_prev, h_prev=h_prev, y=y, gates=gates, gate_map=gate_map
    )
    b, cout, ho, wo = y.shape
    evaluate = c_prev is None
    v2 = x_rec is not None
    # channels_last with whole 64-channel groups: K tap-major, the weight's columns to match
    # (forward._accumulate); otherwise channel-major, as the weight is stored.
    tap_major = x.stride(1) == 1 and x.shape[1] % 64 == 0
    if tap_major:
        weight = weight.unflatten(1, (2 if v2 else 1, -1)).permute(0, 1, 3, 4, 2)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels index it densely
    ss = y.stride()
    for t in (c_new, c_prev, h_prev, h_new):  # the kernel addresses them with y's strides
        assert t is None or same_layout(t, y), "state-shaped tensors must share y's layout"
    sg = gates.stride() if gates.dim() == 4 else (0, 0, 0, 0)
    if v2:
        assert same_layout(x_rec, x), "x~ must share x's layout"
    grid = lambda meta: (triton.cdiv(b * ho * wo, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))  # noqa: E731
    if evaluate:  # unused pointer arguments get y
        c_prev = c_new = y
    with on_device(x):
        bconv_cell_fwd_kernel[grid](
            x, x_rec if v2 else x, weight, bias if bias is not None else weight,
            c_prev, h_prev if v2 else c_prev, h_alpha if v2 else c_prev,
            y, c_new, h_new if v2 else c_new, gates if gates.numel() else y,
            gate_map if gate_map is not None else y,
            b, x.shape[1], x.shape[2], x.shape[3], cout, ho, wo, stride, padding,
            *x.stride(), *ss, *sg,
            KS=weight.shape[-2], V2=v2, HAS_BIAS=bias is not None, SAVE_GATES=gates.numel() > 0,
            EVAL=evaluate, HAS_MAP=gate_map is not None, TAP_MAJOR=tap_major,
            DOT_PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc(x.dtype),
        )  # fmt: skip


@torch.library.custom_op("ptl_fused::triton_bconv_cell_fwd", mutates_args=())
def bconv_cell_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_prev: Tensor,
    stride: int,
    padding: int,
    save_gates: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    (y, c_new), gates, fmt = _outputs(x, weight, c_prev, stride, padding, save_gates, v2=False)
    c_prev = c_prev.contiguous(memory_format=fmt)
    _launch_fwd(x, None, weight, bias, c_prev, None, None, stride, padding, y, c_new, None, gates)
    return y, c_new, gates


@bconv_cell_fwd.register_fake
def _(x, weight, bias, c_prev, stride, padding, save_gates):
    (y, c_new), gates, _ = _outputs(x, weight, c_prev, stride, padding, save_gates, v2=False)
    return y, c_new, gates


def _eval_output(x, weight3, stride, padding):
    b, _, ho, wo = _out_shape(x, weight3, stride, padding)
    fmt = suggest_memory_format(x)
    return torch.empty((b, weight3.shape[0] // 3, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("ptl_fused::triton_bconv_cell_eval", mutates_args=())
def bconv_cell_eval_op(
    x: Tensor, weight3: Tensor, bias3: Tensor | None, gate_map: Tensor | None, stride: int, padding: int
) -> Tensor:
    """y from the zero state (python_ref.bconv_cell_eval); forward only (see ptl_fused.ops)."""
    y = _eval_output(x, weight3, stride, padding)
    if gate_map is not None:
        gate_map = gate_map.to(x.dtype).contiguous()
    empty = x.new_empty(0)
    _launch_fwd(x, None, weight3, bias3, None, None, None, stride, padding, y, None, None, empty, gate_map)
    return y


@bconv_cell_eval_op.register_fake
def _(x, weight3, bias3, gate_map, stride, padding):
    return _eval_output(x, weight3, stride, padding)


def _recover(x, weight_rec, bias_rec, h_prev, stride, padding, fmt):
    """X~ = conv_transpose2d(H_{b-1}) in x's shape and layout (recovery.py)."""
    check_32bit(x=x, h_prev=h_prev, weight_rec=weight_rec)
    b, cin, h, w = x.shape
    cout, k = weight_rec.shape[0], weight_rec.shape[-1]
    x_rec = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    weight_rec = weight_rec.contiguous()
    bias_rec = None if bias_rec is None else bias_rec.contiguous()
    grid = lambda meta: (triton.cdiv(b * h * w, meta["BLOCK_M"]), triton.cdiv(cin, meta["BLOCK_N"]))  # noqa: E731
    with on_device(x):
        recovery_kernel[grid](
            h_prev, weight_rec, bias_rec if bias_rec is not None else weight_rec, x_rec,
            b, cout, h_prev.shape[2], h_prev.shape[3], cin, h, w, stride, padding,
            *h_prev.stride(), *x_rec.stride(),
            KS=k, HAS_BIAS=bias_rec is not None, DOT_PRECISION=_dot_precision(x.dtype),
            ACC_DTYPE=_acc(x.dtype),
        )  # fmt: skip
    return x_rec


@torch.library.custom_op("ptl_fused::triton_bconv_cell_v2_fwd", mutates_args=())
def bconv_cell_v2_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_rec: Tensor,
    bias_rec: Tensor | None,
    c_prev: Tensor,
    h_prev: Tensor,
    h_alpha: Tensor,
    stride: int,
    padding: int,
    save_gates: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    (y, c_new, h_new), gates, fmt = _outputs(x, weight, c_prev, stride, padding, save_gates, v2=True)
    x = x.contiguous(memory_format=fmt)
    x_rec = _recover(x, weight_rec, bias_rec, h_prev, stride, padding, fmt)
    c_prev, h_prev = c_prev.contiguous(memory_format=fmt), h_prev.contiguous(memory_format=fmt)
    alpha = h_alpha.to(device=x.device, dtype=c_prev.dtype).reshape(1)
    _launch_fwd(x, x_rec, weight, bias, c_prev, h_prev, alpha, stride, padding, y, c_new, h_new, gates)
    return y, c_new, h_new, gates, x_rec


@bconv_cell_v2_fwd.register_fake
def _(x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding, save_gates):
    (y, c_new, h_new), gates, fmt = _outputs(x, weight, c_prev, stride, padding, save_gates, v2=True)
    x_rec = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return y, c_new, h_new, gates, x_rec


@torch.library.custom_op("ptl_fused::triton_bconv_cell_bwd", mutates_args=())
def bconv_cell_bwd(
    grad_y: Tensor | None,
    grad_c_new: Tensor | None,
    grad_h_new: Tensor | None,
    c_prev: Tensor,
    gates: Tensor,
    h_alpha: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dZ, dC_prev, dH_prev's aggregation part ((0,) for v1)) from the saved gates."""
    fmt = suggest_memory_format(gates)
    v2 = h_alpha is not None
    c_prev = c_prev.contiguous(memory_format=fmt)
    grad_z = torch.empty_like(gates, memory_format=fmt)
    grad_c_prev = torch.empty_like(c_prev, memory_format=fmt)
    grad_h_prev = torch.empty_like(c_prev, memory_format=fmt) if v2 else c_prev.new_empty(0)

    def prep(t, dtype):
        return None if t is None else t.to(dtype).contiguous(memory_format=fmt)

    gy, gc, gh = prep(grad_y, gates.dtype), prep(grad_c_new, c_prev.dtype), prep(grad_h_new, c_prev.dtype)
    check_32bit(gates=gates, c_prev=c_prev, grad_y=gy, grad_c_new=gc, grad_h_new=gh)
    n = c_prev.numel()
    if n:
        alpha = h_alpha.to(device=c_prev.device, dtype=c_prev.dtype).reshape(1) if v2 else c_prev
        with on_device(gates):
            bconv_cell_bwd_kernel[(triton.cdiv(n, BWD_BLOCK),)](
                gates, c_prev, gy if gy is not None else c_prev, gc if gc is not None else c_prev,
                gh if gh is not None else c_prev, alpha, grad_z, grad_c_prev,
                grad_h_prev if v2 else grad_c_prev,
                n, c_prev.shape[1], c_prev.shape[2], c_prev.shape[3], *c_prev.stride(), *gates.stride(),
                HAS_GY=gy is not None, HAS_GC=gc is not None, V2=v2, HAS_GH=gh is not None,
                ACC_DTYPE=_acc(gates.dtype), BLOCK=BWD_BLOCK,
            )  # fmt: skip
    return grad_z, grad_c_prev, grad_h_prev


@bconv_cell_bwd.register_fake
def _(grad_y, grad_c_new, grad_h_new, c_prev, gates, h_alpha):
    fmt = suggest_memory_format(gates)
    grad_c_prev = torch.empty_like(c_prev, memory_format=fmt)
    grad_h_prev = torch.empty_like(grad_c_prev) if h_alpha is not None else c_prev.new_empty(0)
    return torch.empty_like(gates, memory_format=fmt), grad_c_prev, grad_h_prev


def _bwd_v1(grad_y, grad_c_new, c_prev, gates):
    grad_z, grad_c_prev, _ = bconv_cell_bwd(grad_y, grad_c_new, None, c_prev, gates, None)
    return grad_z, grad_c_prev


# A forward with save_gates=False and a gradient to come: backward runs it again, saving.
bconv_cell_fwd.register_autograd(cell_backward(_bwd_v1, bconv_cell_fwd), setup_context=setup_cell)
bconv_cell_v2_fwd.register_autograd(
    cell_v2_backward(bconv_cell_bwd, bconv_cell_v2_fwd), setup_context=setup_cell_v2
)


def _autocast(device_type: str, *tensors):
    """Autocast for the custom ops: x, weights and biases in the autocast dtype (float64
    stays), the states untouched in float32, as the C++ ops' Autocast kernels do."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def bconv_cell(x, weight, bias, c_prev, stride, padding, recompute=False):
    save = saves_gates(recompute, x, weight, bias, c_prev)
    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    y, c_new, _ = bconv_cell_fwd(x, weight, bias, c_prev, stride, padding, save)
    return y, c_new


def bconv_cell_v2(
    x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding, recompute=False
):
    save = saves_gates(recompute, x, weight, bias, weight_rec, bias_rec, c_prev, h_prev)
    x, weight, bias, weight_rec, bias_rec = _autocast(x.device.type, x, weight, bias, weight_rec, bias_rec)
    y, c_new, h_new, _, _ = bconv_cell_v2_fwd(
        x, weight, bias, weight_rec, bias_rec, c_prev, h_prev, h_alpha, stride, padding, save
    )
    return y, c_new, h_new


def bconv_cell_eval(x, weight3, bias3, gate_map, stride, padding):
    x, weight3, bias3, gate_map = _autocast(x.device.type, x, weight3, bias3, gate_map)
    return bconv_cell_eval_op(x, weight3, bias3, gate_map, stride, padding)
