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

from cells import CASES, DTYPES, WIDE_CASES, make_inputs
from tolerances import assert_matches_oracle

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "tests/emulation/fused_gemm_emulated.cpp",
    ROOT / "tests/emulation/cuda_emulation.h",
    ROOT / "csrc/cuda/fused_gemm_kernel.cuh",
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
        f"ptl_fused_gemm_emulated_{digest}",
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


def _emulated_forward(a: dict, case, v2: bool, channels_last: bool):
    dtype, sdt = a["x"].dtype, a["c_prev"].dtype
    b, cout = a["x"].shape[0], a["weight"].shape[0] // 4
    state_shape = (b, cout, *case.out_hw)
    outs = {
        "y": _guarded(state_shape, dtype, channels_last),
        "c_new": _guarded(state_shape, sdt, channels_last),
        "h_new": _guarded(state_shape, sdt, channels_last) if v2 else None,
        "gates": _guarded((b, 4 * cout, *case.out_hw), dtype, channels_last),
    }
    cin = a["x"].shape[1]
    emulated().fwd(
        _layout(a["x"], channels_last),
        _layout(_gate_input(a, case, v2)[:, cin:], channels_last) if v2 else None,
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
@pytest.mark.parametrize("case", CASES + WIDE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_forward_matches_reference(dtype, case, v2, channels_last):
    master = make_inputs(case, v2)
    oracle = _reference(_cast(master, torch.float64), case, v2)
    eager = _reference(_cast(master, dtype), case, v2)
    got = _emulated_forward(_cast(master, dtype), case, v2, channels_last)
    names = ["y", "c_new", "h_new", "gates"] if v2 else ["y", "c_new", "gates"]
    for name, g, e, o in zip(names, got, eager, oracle, strict=True):
        assert_matches_oracle(f"{case} {name}", g, e, o, dtype)


def _zero_state(a: dict) -> dict:
    return {n: torch.zeros_like(t) if n in ("c_prev", "h_prev") else t for n, t in a.items()}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES + WIDE_CASES, ids=str)
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
