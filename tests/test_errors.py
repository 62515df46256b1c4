"""Bad input: a clear error naming the argument, expected and actual values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ptl_fused
from ptl_fused import ops
from ptl_fused.backends import BACKENDS


def _v1(**over):
    args = dict(
        x=torch.randn(2, 3, 7, 5),
        weight=torch.randn(16, 3, 3, 3),
        bias=None,
        c_prev=torch.zeros(2, 4, 7, 5),
        stride=1,
        padding=1,
    )
    args.update(over)
    return args


def _v2(**over):
    args = dict(
        x=torch.randn(2, 3, 7, 5),
        weight=torch.randn(16, 6, 3, 3),
        bias=None,
        weight_rec=torch.randn(4, 3, 3, 3),
        bias_rec=None,
        c_prev=torch.zeros(2, 4, 7, 5),
        h_prev=torch.zeros(2, 4, 7, 5),
        h_alpha=0.5,
        stride=1,
        padding=1,
    )
    args.update(over)
    return args


V1_CASES = [
    (dict(x=torch.randn(3, 7, 5)), ValueError, r"x must be 4-D \(B, Cin, H, W\), got shape \(3, 7, 5\)"),
    (
        dict(x=torch.ones(2, 3, 7, 5, dtype=torch.long)),
        TypeError,
        "x must be a floating-point tensor, got torch.int64",
    ),
    (dict(weight=torch.randn(16, 5, 3, 3)), ValueError, "weight has 5 input channels but x has Cin=3"),
    (dict(weight=torch.randn(15, 3, 3, 3)), ValueError, r"weight must be \(4\*Cout, 3, k, k\)"),
    (
        dict(weight=torch.randn(16, 3, 3, 3, dtype=torch.float64)),
        TypeError,
        "weight is torch.float64 but x is torch.float32",
    ),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(4\*Cout,\) = \(16,\) .* \(Cout = 4\)"),
    (dict(bias=torch.randn(16).double()), TypeError, "bias is torch.float64 but weight is torch.float32"),
    (
        dict(bias=torch.ones(16, dtype=torch.long)),
        TypeError,
        "bias is torch.int64 but weight is torch.float32",
    ),
    (dict(x=torch.randn(2, 0, 7, 5), weight=torch.randn(16, 0, 3, 3)), ValueError, "x has no channels"),
    (
        dict(c_prev=torch.zeros(2, 4, 5, 5)),
        ValueError,
        r"c_prev must have shape \(B, Cout, Ho, Wo\) = \(2, 4, 7, 5\), got \(2, 4, 5, 5\)",
    ),
    (dict(c_prev=torch.zeros(2, 4, 7, 5, dtype=torch.bfloat16)), TypeError, "c_prev must be torch.float32"),
    (dict(c_prev=torch.zeros(2, 4, 7, 5, device="meta")), ValueError, "c_prev is on meta but x is on cpu"),
    (dict(weight=torch.randn(16, 3, 3, 3, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    (dict(stride=0), ValueError, "stride must be an int >= 1, got 0"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0, got -1"),
    (dict(stride=np.int64(1)), ValueError, r"stride must be a Python int >= 1, got np.int64\(1\) \(int64\)"),
    (
        dict(x=torch.randn(2, 3, 1, 1), padding=0),
        ValueError,
        "spatial size 1x1 is too small for kernel_size=3",
    ),
    (dict(c_prev=[0.0]), TypeError, "c_prev must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("over,exc,msg", V1_CASES, ids=lambda v: None)
def test_v1_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.bconv_cell(**_v1(**over))


V2_CASES = [
    (dict(weight=torch.randn(16, 3, 3, 3)), ValueError, r"2\*Cin for v2"),
    (
        dict(weight_rec=torch.randn(4, 3, 5, 5)),
        ValueError,
        r"weight_rec must have shape \(Cout, Cin, k, k\) = \(4, 3, 3, 3\)",
    ),
    (dict(bias_rec=torch.randn(4)), ValueError, r"bias_rec must have shape \(3,\)"),
    (dict(h_prev=torch.zeros(1, 4, 7, 5)), ValueError, r"h_prev must have shape .* got \(1, 4, 7, 5\)"),
    (dict(h_alpha=torch.ones(2)), ValueError, "h_alpha must be a float or a one-element"),
    (dict(h_alpha="half"), TypeError, "h_alpha must be a float"),
    (dict(h_alpha=True), TypeError, "h_alpha must be a float"),
    (dict(h_alpha=torch.tensor(0.5, device="meta")), ValueError, "h_alpha is on meta but x is on cpu"),
    (dict(weight_rec=torch.randn(4, 3, 3, 3).double()), TypeError, "weight_rec is torch.float64 but weight"),
    (
        dict(bias_rec=torch.randn(3).half()),
        TypeError,
        "bias_rec is torch.float16 but weight is torch.float32",
    ),
]


@pytest.mark.parametrize("over,exc,msg", V2_CASES, ids=lambda v: None)
def test_v2_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.bconv_cell_v2(**_v2(**over))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_h_alpha_is_a_constant_and_numpy_scalars_are_floats(backend):
    # h_alpha gets no gradient on any backend; a numpy float32 is a float like any other.
    import numpy as np

    alpha = torch.tensor(0.25, requires_grad=True)
    args = _v2(h_alpha=alpha)
    args["x"].requires_grad_()
    y, _, h = ops.bconv_cell_v2(**args, backend=backend)
    (y.sum() + h.sum()).backward()
    assert alpha.grad is None and args["x"].grad is not None
    args["h_alpha"] = np.float32(0.25)
    torch.testing.assert_close(ops.bconv_cell_v2(**args, backend=backend)[2], h.detach())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "alpha",
    [
        torch.tensor(0.25),
        torch.tensor([0.25]),
        torch.full((1, 1, 1, 1, 1), 0.25),
        torch.tensor([0.25]).double(),
    ],
    ids=["0-dim", "(1,)", "(1,1,1,1,1)", "(1,)-float64"],
)
def test_h_alpha_tensor_of_one_element_is_a_scalar_of_the_state_dtype(backend, alpha):
    # Any one-element float tensor is accepted, so every backend must read it alike: h_new
    # keeps the state's shape and dtype (a float64 alpha would otherwise promote it, and a 5-D
    # one broadcast it, and the next step would refuse the state).
    args = _v2(h_alpha=alpha)
    _, _, h = ops.bconv_cell_v2(**args, backend=backend)
    _, _, want = ops.bconv_cell_v2(**{**args, "h_alpha": 0.25}, backend=backend)
    assert h.shape == want.shape and h.dtype == want.dtype == torch.float32
    torch.testing.assert_close(h, want, rtol=0, atol=0)


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"unknown backend 'fastest'.*available here: \['reference'"):
        ops.bconv_cell(**_v1(), backend="fastest")


def test_backend_on_wrong_device_or_unavailable():
    if "cuda" in ptl_fused.available_backends():
        with pytest.raises(ValueError, match="backend 'cuda' runs on cuda tensors, but x is on cpu"):
            ops.bconv_cell(**_v1(), backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            ops.bconv_cell(**_v1(), backend="cuda")


def test_triton_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    # An old Triton's interpreter (3.6 with NumPy 2.4) fails every kernel; the backend then
    # says why it is unavailable instead of failing each call.
    triton_ops = pytest.importorskip("ptl_fused.triton.ops")
    if not triton_ops.INTERPRET:
        pytest.skip("Triton compiles for the GPU here; its interpreter is not used")
    monkeypatch.setattr(triton_ops, "interpreter_problem", lambda: "Triton 0.0's CPU interpreter cannot")
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available: Triton 0.0's CPU interp"):
        ops.bconv_cell(**_v1(), backend="triton")


def test_triton_refuses_tensors_past_32_bit_offsets():
    # The Triton kernels index in int32: a tensor spanning 2^31 elements is refused by name
    # (meta tensors: the sizes without the memory), one just below passes.
    triton_ops = pytest.importorskip("ptl_fused.triton.ops")
    big = torch.empty_strided((3, 8, 4, 4), (2**30, 1, 32, 8), device="meta")  # last offset 2^31 + 127
    with pytest.raises(ValueError, match=r"backend 'triton' indexes in 32 bits, but x \(3, 8, 4, 4\)"):
        triton_ops.check_32bit(weight=torch.empty(4, 8, 3, 3, device="meta"), x=big)
    triton_ops.check_32bit(
        x=torch.empty_strided((3, 8, 4, 4), (2**30 - 64, 1, 32, 8), device="meta")
    )  # 2^31 - 1


@pytest.mark.parametrize("op", ["bconv_cell_fwd", "bconv_cell_eval"])
def test_fused_gemm_on_cpu_tensors_is_refused(op):
    # The implicit-GEMM kernel is CUDA-only; on the CPU the op says so instead of falling back.
    a = _v1()
    if op == "bconv_cell_eval":
        args = (a["x"], a["weight"][: 3 * a["weight"].shape[0] // 4], None, None, 1, 1, True)
    else:
        args = (a["x"], a["weight"], a["bias"], a["c_prev"], 1, 1, True)
    with pytest.raises(RuntimeError, match=r"fused_gemm=True .* runs on CUDA tensors only; x is on cpu"):
        getattr(torch.ops.ptl_fused, op)(*args)


def test_raw_op_with_an_unsupported_dtype_is_refused():
    # ptl_fused.ops refuses a non-float x first; the raw backward takes the gates as given,
    # and the CPU kernel's own check names the dtype.
    gates = torch.zeros(1, 8, 2, 2, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="unsupported dtype Float8_e4m3fn"):
        torch.ops.ptl_fused.bconv_cell_bwd(torch.zeros(1, 2, 2, 2), None, torch.zeros(1, 2, 2, 2), gates)


def _raw_bwd_args():
    c_prev = torch.rand(2, 3, 4, 5)
    gates = torch.rand(2, 12, 4, 5)
    grads = [torch.rand(2, 3, 4, 5) for _ in range(3)]
    return grads, c_prev, gates


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize(
    "bad,message",
    [
        ("c_prev", r"c_prev must be \[2, 3, 4, 5\] for gates of shape \[2, 12, 4, 5\], got \[2, 3, 4, 4\]"),
        ("grad_y", r"grad_y must be \[2, 3, 4, 5\], got \[2, 3, 4, 4\]"),
        ("grad_c_new", r"grad_c_new must be \[2, 3, 4, 5\], got \[2, 3, 4, 4\]"),
        ("grad_h_new", r"grad_h_new must be \[2, 3, 4, 5\], got \[2, 3, 4, 4\]"),
        ("gates", r"gates must be a floating \(B, 4\*Cout, Ho, Wo\) tensor, got Float \[2, 10, 4, 5\]"),
        ("c_prev dtype", r"c_prev must be Float, got Double"),
    ],
)
def test_raw_backward_op_refuses_inconsistent_shapes(v2, bad, message):
    # The kernel sizes its loops by c_prev and indexes the gradients alike: a mismatched shape
    # wrote past the end of grad_z and corrupted the heap (the process died in free()).
    if bad == "grad_h_new" and not v2:
        pytest.skip("v1 has no hidden state")
    (gy, gc, gh), c_prev, gates = _raw_bwd_args()
    args = dict(grad_y=gy, grad_c_new=gc, grad_h_new=gh, c_prev=c_prev, gates=gates)
    if bad == "gates":
        args["gates"] = gates[:, :10].contiguous()
    elif bad == "c_prev dtype":
        args["c_prev"] = c_prev.double()
    else:
        args[bad] = args[bad][..., :4].contiguous()
    alpha = torch.tensor(0.5)
    with pytest.raises(RuntimeError, match=message):
        if v2:
            torch.ops.ptl_fused.bconv_cell_v2_bwd(*args.values(), alpha)
        else:
            del args["grad_h_new"]
            torch.ops.ptl_fused.bconv_cell_bwd(*args.values())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_is_refused(backend):
    # A gradient penalty needs the derivative of the backward itself, which the fused backends
    # do not have: create_graph=True is refused at once (once_differentiable alone let the
    # weights' second-order terms go missing silently).
    if BACKENDS[backend].unavailable():
        pytest.skip(f"{backend}: {BACKENDS[backend].unavailable()}")
    args = _v1()
    args["x"].requires_grad_()
    args["weight"].requires_grad_()
    y, _ = ops.bconv_cell(**args, backend=backend)
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
        torch.autograd.grad((y * y).sum(), args["x"], create_graph=True)
