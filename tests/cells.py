"""Test cases of the cell: shapes, inputs in op-argument order, and a runner per backend."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import python_ref
from ptl_fused import ops
from ptl_fused.backends import BACKENDS

from tolerances import assert_matches_oracle


@dataclass(frozen=True)
class Case:
    batch: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int
    padding: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((n + 2 * self.padding - self.k) // self.stride + 1 for n in (self.h, self.w))

    def __str__(self) -> str:
        return (
            f"B{self.batch}-{self.cin}to{self.cout}-{self.h}x{self.w}-k{self.k}s{self.stride}p{self.padding}"
        )


# Odd sizes, stride 1/2, padding 0/1, kernel 1/3/5, Cin 1/3, Cout 1, batch 1.
CASES = [
    Case(2, 3, 4, 7, 5, 3, 1, 1),
    Case(2, 3, 4, 7, 5, 3, 2, 1),
    Case(1, 1, 1, 6, 6, 1, 1, 0),
    Case(3, 3, 2, 9, 8, 5, 2, 0),
    Case(2, 1, 3, 5, 7, 5, 1, 1),
    Case(1, 2, 1, 8, 6, 3, 2, 0),
]

# Wider cells for the GPU kernels' tiling (csrc/cuda/fused_gemm.cu, ptl_fused/triton): several
# pixel, channel and reduction tiles, each with a partial last tile (Cout > 64 and not a
# multiple of 32, K = Cin·k·k over many steps, M = B·Ho·Wo not a multiple of 64).
WIDE_CASES = [
    Case(3, 40, 70, 13, 11, 3, 1, 1),
    Case(2, 17, 33, 10, 9, 3, 2, 1),
    Case(2, 24, 40, 9, 9, 5, 1, 2),
    Case(5, 19, 65, 6, 7, 1, 1, 0),
]

# Whole channel groups, for the channels_last gathers: cuda_igemm's 16-byte channel vectors
# (Cin % 8 == 0) and Triton's tap-major K order (Cin % 64 == 0: four of the interpreter's
# BLOCK_K = 16 chunks per tap), with stride 2 and kernel 5.
CHANNELS_LAST_CASES = [
    Case(2, 16, 6, 7, 6, 3, 2, 1),
    Case(1, 64, 5, 5, 4, 5, 1, 2),
]

# The state dtype of each compute dtype (DESIGN.md §1).
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def backend_params(device_types=("cpu", "cuda")):
    """(backend, device) pairs to test: each backend on each device it runs on, skipped with
    the reason where this machine cannot run it."""
    params = []
    for name, b in BACKENDS.items():
        for dev in b.device_types:
            if dev not in device_types:
                continue
            why = b.unavailable()
            if dev == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device on this machine"
            marks = [pytest.mark.skip(reason=f"{name} on {dev}: {why}")] if why else []
            params.append(pytest.param(name, dev, id=f"{name}-{dev}", marks=marks))
    return params


def skip_unsupported(backend: str, device: str, dtype: torch.dtype) -> None:
    """The one dtype gap, stated: Triton's CPU interpreter has no bf16 dot."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter has no bfloat16 dot (bf16 is tested on the GPU)")


def make_inputs(case: Case, v2: bool, bias: bool = True, seed: int = 0) -> dict[str, Tensor]:
    """float64 master inputs on the CPU, in op-argument order (h_alpha last for v2)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    cin_gate = 2 * case.cin if v2 else case.cin
    fan_in = cin_gate * case.k * case.k
    state = (case.batch, case.cout, *case.out_hw)
    args = {
        "x": rnd(case.batch, case.cin, case.h, case.w),
        "weight": rnd(4 * case.cout, cin_gate, case.k, case.k, scale=fan_in**-0.5),
        "bias": rnd(4 * case.cout, scale=0.1) if bias else None,
    }
    if v2:
        args["weight_rec"] = rnd(case.cout, case.cin, case.k, case.k, scale=(case.cout * case.k**2) ** -0.5)
        args["bias_rec"] = rnd(case.cin, scale=0.1) if bias else None
    args["c_prev"] = rnd(*state, scale=0.5)
    if v2:
        args["h_prev"] = rnd(*state, scale=0.5)
        args["h_alpha"] = 0.25
    return args


STATE_ARGS = ("c_prev", "h_prev")


def cast_inputs(master: dict, dtype: torch.dtype, device: str, requires_grad: bool = True) -> dict:
    """Compute-dtype copies (states in their state dtype) that are leaves requiring grad."""
    sdtype = python_ref.state_dtype(dtype)
    out = {}
    for name, t in master.items():
        if isinstance(t, Tensor):
            t = t.to(device=device, dtype=sdtype if name in STATE_ARGS else dtype)
            t.requires_grad_(requires_grad)
        out[name] = t
    return out


def call(backend: str, args: dict, case: Case, v2: bool, recompute: bool = False):
    """Runs the cell through ptl_fused.ops (or python_ref itself for 'oracle')."""
    fn = (python_ref.bconv_cell_v2 if v2 else python_ref.bconv_cell) if backend == "oracle" else None
    if fn is None:
        fn = ops.bconv_cell_v2 if v2 else ops.bconv_cell
        return fn(*args.values(), case.stride, case.padding, backend=backend, recompute=recompute)
    return fn(*args.values(), case.stride, case.padding)


def forward_backward(backend: str, args: dict, case: Case, v2: bool, seed: int = 1, recompute: bool = False):
    """Outputs and the gradient of every tensor input under sum(out_i * r_i), r_i random."""
    outs = call(backend, args, case, v2, recompute)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs
    )
    leaves = {n: t for n, t in args.items() if isinstance(t, Tensor) and t.requires_grad}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return outs, dict(zip(leaves, grads, strict=True))


OUT_NAMES = ("y", "c_new", "h_new")


def to_channels_last(args):
    return {
        n: t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        if isinstance(t, torch.Tensor) and t.dim() == 4
        else t
        for n, t in args.items()
    }


def every_other(t: Tensor) -> Tensor:
    """The same values as t, as an every-other-element view of its last dim into a buffer twice
    as wide: not contiguous, and not readable as dense by a raw pointer."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def check_cell(backend, device, case, v2, dtype, master, layout=None, recompute=False):
    """Forward, every gradient and the carried state of `backend` against python_ref (float64
    oracle), within tolerances.py's bound; `layout` re-lays out the cast inputs."""
    skip_unsupported(backend, device, dtype)
    oracle_out, oracle_grad = forward_backward("oracle", cast_inputs(master, torch.float64, "cpu"), case, v2)
    eager_out, eager_grad = forward_backward("oracle", cast_inputs(master, dtype, device), case, v2)
    args = cast_inputs(master, dtype, device)
    if layout is not None:
        args = layout(args)
    got_out, got_grad = forward_backward(backend, args, case, v2, recompute=recompute)
    for name, got, eager, oracle in zip(OUT_NAMES, got_out, eager_out, oracle_out, strict=False):
        want_dtype = dtype if name == "y" else (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.dtype == want_dtype, f"{name} is {got.dtype}, expected {want_dtype}"
        assert_matches_oracle(f"{case} {name}", got, eager, oracle, dtype)
    assert got_grad.keys() == oracle_grad.keys()
    for name in oracle_grad:
        assert got_grad[name] is not None, f"no gradient for {name}"
        assert_matches_oracle(f"{case} d{name}", got_grad[name], eager_grad[name], oracle_grad[name], dtype)


def zero_state_reference(args: dict, case, v2: bool):
    """y of the full python_ref cell from C_{b-1} = H_{b-1} = 0 (what eval means)."""
    a = dict(args)
    a["c_prev"] = torch.zeros_like(a["c_prev"])
    if v2:
        a["h_prev"] = torch.zeros_like(a["h_prev"])
        return python_ref.bconv_cell_v2(*a.values(), case.stride, case.padding)[0]
    return python_ref.bconv_cell(*a.values(), case.stride, case.padding)[0]


def eval_shortcut(args: dict, case, v2: bool, backend: str):
    a = {n: t for n, t in args.items() if n not in ("c_prev", "h_prev", "h_alpha")}
    with torch.no_grad():
        if v2:
            outs = ops.bconv_cell_v2(
                a["x"], a["weight"], a["bias"], a["weight_rec"], a["bias_rec"], None, None, 1.0,
                case.stride, case.padding, backend=backend,
            )  # fmt: skip
            assert outs[1:] == (None, None), "inference returns no state"
        else:
            outs = ops.bconv_cell(a["x"], a["weight"], a["bias"], None, case.stride, case.padding, backend)
            assert outs[1] is None, "inference returns no state"
    return outs[0]
