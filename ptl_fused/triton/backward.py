"""Triton backward epilogue of the BConv-Cell: one elementwise pass over the state points.

Reference: the autograd of python_ref.bconv_cell / bconv_cell_v2 (csrc/cell_math.h holds the
same formulas for the C++ backends). From the saved activated gates, C_{b-1} and the incoming
gradients it writes dZ for all four gates and dC_{b-1} (v2: (1 - alpha)·dH_b, the
aggregation's share of dH_{b-1}); C_b is recomputed, not saved.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import _tanh


@triton.jit(do_not_specialize=["N"])  # N = B·Cout·Ho·Wo: no recompile per batch size (forward.py)
def bconv_cell_bwd_kernel(
    gates_ptr,
    cp_ptr,
    gy_ptr,
    gc_ptr,
    gh_ptr,
    alpha_ptr,
    gz_ptr,
    gcp_ptr,
    ghp_ptr,
    N,
    Cout,
    Ho,
    Wo,
    ss_b,
    ss_c,
    ss_h,
    ss_w,  # every state-shaped tensor
    sg_b,
    sg_c,
    sg_h,
    sg_w,  # gates and grad_z
    HAS_GY: tl.constexpr,
    HAS_GC: tl.constexpr,
    V2: tl.constexpr,
    HAS_GH: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w = offs % Wo
    h = (offs // Wo) % Ho
    c = (offs // (Wo * Ho)) % Cout
    b = offs // (Wo * Ho * Cout)
    s_off = b * ss_b + c * ss_c + h * ss_h + w * ss_w
    g_off = b * sg_b + c * sg_c + h * sg_h + w * sg_w
    gstep = Cout * sg_c
    i = tl.load(gates_ptr + g_off, mask=mask, other=0.0).to(ACC_DTYPE)
    f = tl.load(gates_ptr + g_off + gstep, mask=mask, other=0.0).to(ACC_DTYPE)
    o = tl.load(gates_ptr + g_off + 2 * gstep, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(gates_ptr + g_off + 3 * gstep, mask=mask, other=0.0).to(ACC_DTYPE)
    c_prev = tl.load(cp_ptr + s_off, mask=mask, other=0.0).to(ACC_DTYPE)

    dy = tl.zeros_like(c_prev)
    if HAS_GY:
        dy += tl.load(gy_ptr + s_off, mask=mask, other=0.0).to(ACC_DTYPE)
    dh = tl.zeros_like(c_prev)
    if V2:
        if HAS_GH:
            dh = tl.load(gh_ptr + s_off, mask=mask, other=0.0).to(ACC_DTYPE)
        alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
        dy += alpha * dh
        tl.store(ghp_ptr + s_off, ((1.0 - alpha) * dh).to(ghp_ptr.dtype.element_ty), mask=mask)
    t = _tanh(f * c_prev + i * g)
    dc = tl.zeros_like(c_prev)
    dzo = tl.zeros_like(c_prev)
    if HAS_GY or HAS_GH:  # else y's path is absent, as in autograd (a NaN in o or t stays out)
        dc = dy * o * (1.0 - t * t)
        dzo = dy * t * o * (1.0 - o)
    if HAS_GC:
        dc += tl.load(gc_ptr + s_off, mask=mask, other=0.0).to(ACC_DTYPE)
    out = gz_ptr.dtype.element_ty
    tl.store(gz_ptr + g_off, (dc * g * i * (1.0 - i)).to(out), mask=mask)
    tl.store(gz_ptr + g_off + gstep, (dc * c_prev * f * (1.0 - f)).to(out), mask=mask)
    tl.store(gz_ptr + g_off + 2 * gstep, dzo.to(out), mask=mask)
    tl.store(gz_ptr + g_off + 3 * gstep, (dc * i * (1.0 - g * g)).to(out), mask=mask)
    tl.store(gcp_ptr + s_off, (dc * f).to(gcp_ptr.dtype.element_ty), mask=mask)
