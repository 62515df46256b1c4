"""The CUDA implicit-GEMM kernel (csrc/cuda/fused_gemm_kernel.cuh, backend cuda_igemm) run
on the CPU: its own source compiled for the host against tests/emulation/cuda_emulation.h
(a block's threads as std::threads, __syncthreads as a barrier, WMMA as whole-tile ops with
the alignment and ldm rules checked), with the same parameter set-up as its CUDA entry
points. This checks the kernel's indexing, tiling, barriers, shared-memory reuse and cell
math against python_ref, and that it writes every output element and nothing outside. It is
not a GPU run (the hardware's fragment layout and timing): on a GPU the same kernel runs in
tests/test_equivalence.py and tests/test_eval_path.py as backend cuda_igemm.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import python_ref
from python_ref import eval_gate_rows, output_padding, state_dtype, v2_gate_map

from cells import CASES, CHANNELS_LAST_CASES, DTYPES, WIDE_CASES, every_other, make_inputs
from tolerances import assert_matches_oracle

ROOT = Path(__file__).resolve().parents[1]
# The NHWC cases whose Cin is a multiple of 8 run the tensor-core tap-major gather: Cin 40 and
# 24 at stride 1 (WIDE_CASES), 16 and 64 at stride 2 and kernel 5 (CHANNELS_LAST_CASES).
KERNEL_CASES = CASES + WIDE_CASES + CHANNELS_LAST_CASES
SOURCES = [
    ROOT / "tests/emulation/cuda_kernels_emulated.cpp",
    ROOT / "tests/emulation/cuda_emulation.h",
    ROOT / "csrc/cuda/fused_gemm_kernel.cuh",
    ROOT / "csrc/cuda/epilogue_kernels.cuh",
    ROOT / "csrc/cuda/vec.cuh",
    ROOT / "csrc/cell_math.h",
    ROOT / "csrc/bconv_cell.h",
]


@functools.cache
def emulated():
    from torch.utils.cpp_extension import load

    # The name carries a hash of every file compiled in, so an edited header never reuses a
    # stale build (torch's JIT cache only hashes the .cpp).
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    return load(
        f"ptl_fused_cuda_emulated_{digest}",
        [str(SOURCES[0])],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests/emulation")],
        extra_cflags=["-O2", "-std=c++20"],
    )


def _guarded(shape, dtype, channels_last: bool, guard: int = 97):
    """An output tensor inside a NaN-filled buffer with `guard` elements either side."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    flat = buf[guard : guard + n]
    if channels_last:
        b, c, h, w = shape
        return flat.view(b, h, w, c).permute(0, 3, 1, 2), buf, guard
    return flat.view(shape), buf, guard


def _written_exactly(name: str, out) -> torch.Tensor:
    t, buf, guard = out
    assert buf[:guard].isnan().all() and buf[-guard:].isnan().all(), f"{name}: written out of bounds"
    assert not t.isnan().any(), f"{name}: not every element written"
    return t


def _layout(t, channels_last: bool):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _gate_input(a: dict, case, v2: bool) -> torch.Tensor:
    """[x, X~] (v2) or x, with X~ = the recovery of python_ref in a's dtype."""
    if not v2:
        return a["x"]
    op = [output_padding(n, case.k, case.stride, case.padding) for n in a["x"].shape[-2:]]
    x_rec = F.conv_transpose2d(
        a["h_prev"].to(a["x"].dtype), a["weight_rec"], a["bias_rec"], case.stride, case.padding, op
    )
    return torch.cat([a["x"], x_rec], dim=1)


def _gates(a: dict, case, v2: bool) -> torch.Tensor:
    z = F.conv2d(_gate_input(a, case, v2), a["weight"], a["bias"], case.stride, case.padding)
    i, f, o, g = z.chunk(4, dim=1)
    return torch.cat([i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()], dim=1)


def _cast(master: dict, dtype: torch.dtype) -> dict:
    sdt = state_dtype(dtype)
    return {
        n: t.to(sdt if n in ("c_prev", "h_prev") else dtype) if isinstance(t, torch.Tensor) else t
        for n, t in master.items()
    }


def _reference(a: dict, case, v2: bool):
    """(y, c_new[, h_new]) of python_ref and the activated gates, in a's dtype."""
    if v2:
        outs = python_ref.bconv_cell_v2(*a.values(), case.stride, case.padding)
    else:
        outs = python_ref.bconv_cell(*a.values(), case.stride, case.padding)
    return (*outs, _gates(a, case, v2))


def _emulated_forward(
    a: dict, case, v2: bool, channels_last: bool, save_gates: bool = True, source_layout=None
):
    """The emulated kernel's (y, c_new[, h_new][, gates]), each checked to be written exactly;
    `source_layout` re-lays out x (and v2's X~) after the layout of `channels_last`."""
    dtype, sdt = a["x"].dtype, a["c_prev"].dtype
    b, cout = a["x"].shape[0], a["weight"].shape[0] // 4
    state_shape = (b, cout, *case.out_hw)
    outs = {
        "y": _guarded(state_shape, dtype, channels_last),
        "c_new": _guarded(state_shape, sdt, channels_last),
        "h_new": _guarded(state_shape, sdt, channels_last) if v2 else None,
        "gates": _guarded((b, 4 * cout, *case.out_hw), dtype, channels_last) if save_gates else None,
    }
    cin = a["x"].shape[1]
    relaid = source_layout or (lambda t: t)
    emulated().fwd(
        relaid(_layout(a["x"], channels_last)),
        relaid(_layout(_gate_input(a, case, v2)[:, cin:], channels_last)) if v2 else None,
        a["weight"],
        a["bias"],
        _layout(a["c_prev"], channels_last),
        _layout(a["h_prev"], channels_last) if v2 else None,
        torch.tensor([a["h_alpha"]], dtype=sdt) if v2 else None,
        case.stride,
        case.padding,
        channels_last,
        *(o[0] if o else None for o in outs.values()),
    )
    return [_written_exactly(name, o) for name, o in outs.items() if o is not None]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_forward_matches_reference(dtype, case, v2, channels_last):
    master = make_inputs(case, v2)
    oracle = _reference(_cast(master, torch.float64), case, v2)
    eager = _reference(_cast(master, dtype), case, v2)
    got = _emulated_forward(_cast(master, dtype), case, v2, channels_last)
    names = ["y", "c_new", "h_new", "gates"] if v2 else ["y", "c_new", "gates"]
    for name, g, e, o in zip(names, got, eager, oracle, strict=True):
        assert_matches_oracle(f"{case} {name}", g, e, o, dtype)


def _nhwc_at(shape, dtype, offset: int = 0) -> torch.Tensor:
    """A channels_last (B, C, H, W) tensor starting `offset` elements into its buffer."""
    b, c, h, w = shape
    buf = torch.zeros(b * c * h * w + offset, dtype=dtype)
    return buf[offset:].view(b, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("dtype", "cin", "offset", "channels_last", "expected"),
    [
        (torch.bfloat16, 40, 0, True, True),  # 16-byte channel chunks: one vector load each
        (torch.float16, 24, 0, True, True),
        (torch.bfloat16, 17, 0, True, False),  # a chunk would straddle two pixels
        (torch.bfloat16, 40, 1, True, False),  # pixels not on 16-byte boundaries
        (torch.bfloat16, 40, 0, False, False),  # NCHW: channel-major reads it coalesced
        (torch.float64, 17, 1, True, True),  # scalar path (chunk = 1 element): any channels_last
        (torch.float32, 3, 0, True, True),
        (torch.float32, 3, 0, False, False),
    ],
)
def test_emulated_kernel_gathers_channels_last_tap_major(dtype, cin, offset, channels_last, expected):
    # The order the emulated tests above run is the one a GPU launch picks: the NHWC cases
    # with Cin = 16, 24, 40 and 64 run the tap-major vector gather in fp16/bf16, Cin = 17 and
    # 19 the channel-major fallback, and fp32/fp64 check the tap-major indexing on every NHWC
    # case.
    shape = (2, cin, 5, 6)
    x = _nhwc_at(shape, dtype, offset) if channels_last else torch.zeros(shape, dtype=dtype)
    assert emulated().tap_major(x, None) is expected
    if expected:  # v2: both sources must qualify
        assert emulated().tap_major(x, x.contiguous()) is False


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "offset"])
@pytest.mark.parametrize("tap_major", [False, True], ids=["channel_major", "tap_major"])
@pytest.mark.parametrize("cin", [3, 16])
@pytest.mark.parametrize("sources", [1, 2], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_weight_layout(dtype, sources, cin, tap_major, layout):
    # What the fused kernel reads as B: per source, the Cin·k·k columns in the gather's order
    # ((dh, dw, ch) tap-major), zero-padded to a whole number of 16-byte chunks on the
    # tensor-core path (fp16/bf16), 16-byte aligned; the weight itself where it already is so.
    g = torch.Generator().manual_seed(0)
    rows, k = 8, 3
    weight = torch.randn(rows * sources * cin * k * k + 1, generator=g).to(dtype)
    if layout == "offset":  # one element into its storage: never 16-byte aligned
        weight = weight[1:].view(rows, sources * cin, k, k)
    else:
        weight = weight[:-1].view(rows, sources * cin, k, k)
        if layout == "channels_last":
            weight = weight.contiguous(memory_format=torch.channels_last)
    got = emulated().gemm_weight(weight, sources, tap_major)
    w = weight.unflatten(1, (sources, cin))
    want = (w.permute(0, 1, 3, 4, 2) if tap_major else w).reshape(rows, sources, -1)
    chunk = 16 // dtype.itemsize if dtype in (torch.float16, torch.bfloat16) else 1
    ldk = -(-cin * k * k // chunk) * chunk
    assert got.shape == (rows, sources * ldk) and got.is_contiguous()
    assert got.data_ptr() % 16 == 0
    got = got.view(rows, sources, ldk)
    assert torch.equal(got[..., : cin * k * k], want)
    assert not got[..., cin * k * k :].any(), "the padding columns must be zero"
    in_place = ldk == cin * k * k and layout != "offset" and (sources == 1 or not tap_major)
    in_place = in_place and (layout == "channels_last") == tap_major
    assert (got.data_ptr() == weight.data_ptr()) is in_place


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_emulated_forward_channels_last_weight(dtype):
    # A model moved to channels_last has channels_last weights; tap-major then reads the
    # weight in place (a view, no copy) and must give exactly the contiguous weight's result.
    case = WIDE_CASES[0]
    a = _cast(make_inputs(case, False), dtype)
    ref = _emulated_forward(a, case, False, True)
    a["weight"] = a["weight"].contiguous(memory_format=torch.channels_last)
    for r, got in zip(ref, _emulated_forward(a, case, False, True), strict=True):
        assert torch.equal(r, got)


def _relayout(layout: str, channels_last: bool):
    """A function giving a tensor's values in another layout of the kind the host hands the
    kernel as it comes (x is not made contiguous): `strided`, every other element of a buffer
    twice as wide (NCHW order); `offset`, one element into its buffer (no pixel on a 16-byte
    boundary); `channel_slice`, the first channels of a tensor with 8 more (torch.chunk)."""

    def relaid(t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = t.shape
        if layout == "strided":
            return every_other(t)
        if layout == "offset":
            out = (
                _nhwc_at(t.shape, t.dtype, 1)
                if channels_last
                else torch.zeros(t.numel() + 1, dtype=t.dtype)[1:]
            )
            return out.view(t.shape).copy_(t)
        wide = (
            torch.zeros(b, h, w, c + 8, dtype=t.dtype).permute(0, 3, 1, 2)
            if channels_last
            else t.new_zeros(b, c + 8, h, w)
        )
        return wide[:, :c].copy_(t)

    return relaid


@pytest.mark.parametrize("layout", ["strided", "offset", "channel_slice"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", [CHANNELS_LAST_CASES[0], WIDE_CASES[1]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_forward_reads_any_source_layout_without_bias(dtype, case, v2, channels_last, layout):
    # x (and v2's X~) in the caller's strides, and no bias (a null bias pointer): the kernel's
    # gather reads any strides; the tap-major one also pixels further apart than Cin.
    master = make_inputs(case, v2, bias=False)
    oracle = _reference(_cast(master, torch.float64), case, v2)
    eager = _reference(_cast(master, dtype), case, v2)
    a = _cast(master, dtype)
    relaid = _relayout(layout, channels_last)
    if layout == "channel_slice" and channels_last and case.cin % 8 == 0:
        # Cin = 16 in rows of 24: the 16-byte tensor-core gather over non-dense pixels.
        assert emulated().tap_major(relaid(_layout(a["x"], True)), None)
    got = _emulated_forward(a, case, v2, channels_last, source_layout=relaid)
    names = ["y", "c_new", "h_new", "gates"] if v2 else ["y", "c_new", "gates"]
    for name, g, e, o in zip(names, got, eager, oracle, strict=True):
        assert_matches_oracle(f"{case} {layout} {name}", g, e, o, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_forward_without_gates_gives_the_same_cell(dtype, case, v2, channels_last):
    """save_gates=False (no backward, or a recomputing one): no gate tensor is passed at all
    (a write to it would be a null pointer), and y, C_b (, H_b) are the saving run's bits."""
    a = _cast(make_inputs(case, v2), dtype)
    saving = _emulated_forward(a, case, v2, channels_last)[:-1]
    unsaved = _emulated_forward(a, case, v2, channels_last, save_gates=False)
    for name, got, want in zip(["y", "c_new", "h_new"][: len(saving)], unsaved, saving, strict=True):
        assert torch.equal(got, want), f"{case} {name}"


def _zero_state(a: dict) -> dict:
    return {n: torch.zeros_like(t) if n in ("c_prev", "h_prev") else t for n, t in a.items()}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_eval_matches_zero_state_cell(dtype, case, v2, channels_last):
    master = make_inputs(case, v2)
    oracle = _reference(_zero_state(_cast(master, torch.float64)), case, v2)[0]
    eager = _reference(_zero_state(_cast(master, dtype)), case, v2)[0]
    a = _cast(master, dtype)
    # The eval op's arguments as ptl_fused.ops builds them (v2: the bias goes into the map).
    if v2:
        cin = a["x"].shape[1]
        w3, b3 = eval_gate_rows(a["weight"][:, :cin]), None
        gate_map = v2_gate_map(
            a["weight"], a["bias"], a["bias_rec"], a["x"].shape[-2:], case.stride, case.padding
        )
        gate_map = (gate_map.permute(1, 2, 0) if channels_last else gate_map).contiguous()
    else:
        w3, b3, gate_map = eval_gate_rows(a["weight"]), eval_gate_rows(a["bias"]), None
    y = _guarded((a["x"].shape[0], w3.shape[0] // 3, *case.out_hw), dtype, channels_last)
    emulated().eval(
        _layout(a["x"], channels_last), w3, b3, gate_map, case.stride, case.padding, channels_last, y[0]
    )
    assert_matches_oracle(f"{case} eval y", _written_exactly("y", y), eager, oracle, dtype)


def test_emulation_checks_wmma_alignment():
    # The stand-in's WMMA rules are live: a misaligned tile pointer is reported (the kernel's
    # own loads and stores pass the same check in every test above).
    assert emulated().misaligned_wmma_load() == "load_matrix_sync: pointer not 32-byte aligned"


def test_emulation_checks_barriers_warps_and_unwritten_shared_memory():
    # The other rules are live too (planted faults in tests/emulation/cuda_kernels_emulated.cpp):
    # threads meeting different __syncthreads(), WMMA under a lane-divergent branch, and a read
    # of shared memory that the block did not write (poisoned to NaN, not a previous block's).
    assert "met at different __syncthreads()" in emulated().divergent_barrier()
    assert emulated().divergent_wmma() == "lane 16 of warp 0 made 0 WMMA calls, lane 0 1"
    assert math.isnan(emulated().unwritten_shared_read())


# ---- The epilogue kernels of backend "cuda" (csrc/cuda/epilogue_kernels.cuh) ----------------
# Shapes: (B, C, Ho, Wo) with a row length (Ho·Wo for NCHW, C for NHWC) that is a multiple of
# 4 (the 16-byte path, V = 4 or 2) and one that is not (V = 1); `offset` starts every tensor one
# element into its buffer, which also forces V = 1.
EPILOGUE_SHAPES = [(2, 8, 4, 6), (3, 5, 3, 7), (1, 12, 5, 5)]


def _rand(shape, dtype, channels_last, g, scale=1.0, offset=False):
    """A random tensor in the layout, optionally one element into a larger buffer."""
    b, c, h, w = shape
    n = b * c * h * w
    buf = torch.randn(n + int(offset), generator=g, dtype=torch.float64).mul_(scale).to(dtype)
    flat = buf[int(offset) :]
    return flat.view(b, h, w, c).permute(0, 3, 1, 2) if channels_last else flat.view(shape)


def _out(shape, dtype, channels_last, offset):
    t, buf, guard = _guarded(shape, dtype, channels_last, guard=96 + int(offset))  # 96: 16-byte aligned
    return t, buf, guard


def _cell_from_z(z, c_prev, h_prev, alpha):
    """python_ref's epilogue on pre-activations z (B, 4C, Ho, Wo): (y, c_new[, h_new], gates)."""
    y, c_new = python_ref.bconv_cell.__globals__["_gates_and_state"](z, c_prev)
    i, f, o, g = z.chunk(4, dim=1)
    gates = torch.cat([i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()], dim=1)
    if h_prev is None:
        return y, c_new, gates
    return y, c_new, h_prev + alpha * (y - h_prev), gates


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("save_gates", [True, False], ids=["save", "nosave"])
def test_emulated_forward_epilogue(dtype, shape, v2, channels_last, offset, save_gates):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    sdt, alpha = state_dtype(dtype), 0.3
    z = _rand((b, 4 * c, h, w), dtype, channels_last, g, scale=2.0, offset=offset)
    c_prev = _rand(shape, sdt, channels_last, g, offset=offset)
    h_prev = _rand(shape, sdt, channels_last, g, offset=offset) if v2 else None
    oracle = _cell_from_z(z.double(), c_prev.double(), h_prev.double() if v2 else None, alpha)
    eager = _cell_from_z(z, c_prev, h_prev, alpha)
    y, c_new = _out(shape, dtype, channels_last, offset), _out(shape, sdt, channels_last, offset)
    h_new = _out(shape, sdt, channels_last, offset) if v2 else None
    z_inout = z.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    emulated().epilogue_fwd(
        z_inout, c_prev, h_prev, torch.tensor([alpha], dtype=sdt) if v2 else None,
        y[0], c_new[0], h_new[0] if v2 else None, channels_last, save_gates,
    )  # fmt: skip
    got = [_written_exactly(n, o) for n, o in (("y", y), ("c_new", c_new), ("h_new", h_new)) if o]
    if save_gates:
        got.append(z_inout)  # the gates are written over z
    else:
        assert torch.equal(z_inout, z), "unsaved gates: z must be left as it is"
        eager, oracle = eager[:-1], oracle[:-1]
    names = ["y", "c_new", "h_new", "gates"] if v2 else ["y", "c_new", "gates"]
    for name, gt, e, o in zip(names[: len(got)], got, eager, oracle, strict=True):
        assert_matches_oracle(f"{shape} {name}", gt, e, o, dtype)


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("grads", ["all", "y_only", "states_only"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_backward_epilogue(dtype, shape, v2, grads, channels_last, offset):
    g = torch.Generator().manual_seed(1)
    b, c, h, w = shape
    sdt, alpha = state_dtype(dtype), 0.3
    z = _rand((b, 4 * c, h, w), dtype, channels_last, g, scale=2.0)
    c_prev = _rand(shape, sdt, channels_last, g, offset=offset)
    h_prev = _rand(shape, sdt, channels_last, g) if v2 else None
    gy = _rand(shape, dtype, channels_last, g, offset=offset) if grads != "states_only" else None
    gc = _rand(shape, sdt, channels_last, g, offset=offset) if grads != "y_only" else None
    gh = _rand(shape, sdt, channels_last, g, offset=offset) if v2 and grads != "y_only" else None

    def autograd_of(z, c_prev, h_prev, gy, gc, gh):
        """d(z, c_prev, h_prev) of sum(y·gy + c_new·gc + h_new·gh) through python_ref."""
        z, c_prev = z.detach().requires_grad_(), c_prev.detach().requires_grad_()
        h_prev = h_prev.detach().requires_grad_() if v2 else None
        outs = _cell_from_z(z, c_prev, h_prev, alpha)[:-1]
        loss = sum((o * gr).sum() for o, gr in zip(outs, (gy, gc, gh), strict=False) if gr is not None)
        leaves = [z, c_prev] + ([h_prev] if v2 else [])
        return [
            d if d is not None else torch.zeros_like(t)
            for d, t in zip(torch.autograd.grad(loss, leaves, allow_unused=True), leaves, strict=True)
        ]

    dbl = [t.double() if t is not None else None for t in (z, c_prev, h_prev, gy, gc, gh)]
    oracle = autograd_of(*dbl)
    eager = autograd_of(z, c_prev, h_prev, gy, gc, gh)
    gates = _cell_from_z(z, c_prev, h_prev, alpha)[-1].contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    grad_z = _out((b, 4 * c, h, w), dtype, channels_last, offset)
    grad_c = _out(shape, sdt, channels_last, offset)
    grad_h = _out(shape, sdt, channels_last, offset) if v2 else None
    emulated().epilogue_bwd(
        gy, gc, gh, c_prev, gates, torch.tensor([alpha], dtype=sdt) if v2 else None,
        grad_z[0], grad_c[0], grad_h[0] if v2 else None, channels_last,
    )  # fmt: skip
    got = [_written_exactly(n, o) for n, o in (("dz", grad_z), ("dc_prev", grad_c)) if o]
    names = ["dz", "dc_prev"]
    if v2:  # the epilogue's part of dH_{b-1}: the aggregation's (1 - alpha)·dH_b
        got.append(_written_exactly("dh_prev", grad_h))
        names.append("dh_prev")
    for name, gt, e, o in zip(names, got, eager, oracle, strict=True):
        assert_matches_oracle(f"{shape} {grads} {name}", gt, e, o, dtype)


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_map", [False, True], ids=["v1", "v2map"])
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_eval_epilogue(dtype, shape, with_map, channels_last, offset):
    g = torch.Generator().manual_seed(2)
    b, c, h, w = shape
    z = _rand((b, 3 * c, h, w), dtype, channels_last, g, scale=2.0, offset=offset)
    gate_map = _rand((1, 3 * c, h, w), dtype, channels_last, g)[0] if with_map else None

    def cell(z, m):
        pre = z + m if m is not None else z
        i, o, gg = pre.chunk(3, dim=1)
        return o.sigmoid() * (i.sigmoid() * gg.tanh()).tanh()

    oracle = cell(z.double(), gate_map.double() if with_map else None)
    eager = cell(z, gate_map)
    y = _out(shape, dtype, channels_last, offset)
    m = None
    if with_map:  # laid out like bconv_cell_eval hands it over: (3C, Ho, Wo) or (Ho, Wo, 3C)
        m = (gate_map.permute(1, 2, 0) if channels_last else gate_map).contiguous()
    emulated().epilogue_eval(z, m, y[0], channels_last)
    assert_matches_oracle(f"{shape} eval y", _written_exactly("y", y), eager, oracle, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_emulated_backward_epilogue_keeps_a_nan_of_ys_path_out_of_a_state_only_gradient(dtype):
    # Only C_b differentiated (no dy, no dH): y's path is absent, as in autograd, so a NaN
    # output gate must not reach dz_i, dz_f, dz_g or dC_{b-1} through 0 * NaN.
    g = torch.Generator().manual_seed(2)
    shape = (2, 3, 5, 7)
    z = _rand((2, 12, 5, 7), dtype, False, g)
    z[0, 6, 1, 2] = float("nan")  # the output gate of channel 0 at one point
    c_prev, gc = _rand(shape, dtype, False, g), _rand(shape, dtype, False, g)
    zl, cl = z.detach().requires_grad_(), c_prev.detach().requires_grad_()
    want = torch.autograd.grad((_cell_from_z(zl, cl, None, 0.0)[1] * gc).sum(), [zl, cl])
    gates = _cell_from_z(z, c_prev, None, 0.0)[-1]
    grad_z, grad_c = _out(z.shape, dtype, False, False), _out(shape, dtype, False, False)
    emulated().epilogue_bwd(None, gc, None, c_prev, gates, None, grad_z[0], grad_c[0], None, False)
    for name, got, ref in zip(("dz", "dc_prev"), (grad_z, grad_c), want, strict=True):
        got = _written_exactly(name, got)
        torch.testing.assert_close(got, ref, msg=name)
