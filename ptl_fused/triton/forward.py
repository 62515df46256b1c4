"""Triton forward of the BConv-Cell: one kernel = implicit-GEMM gate conv + the cell epilogue.

Reference: python_ref.bconv_cell / python_ref.bconv_cell_v2 (this file must match them).

Each program owns BLOCK_M output pixels (of M = B·Ho·Wo) x BLOCK_N channels (of Cout) and
accumulates the four gates of those channels side by side, so the activations, the state
update (and v2's hidden aggregation) happen in registers: the (B, 4·Cout, Ho, Wo)
pre-activations are never written; the activated gates are written only when backward
needs them (SAVE_GATES). For v2 the K loop runs over two sources, x then the recovered X~,
so the concatenation [x, X~] is never materialised. Any stride/padding/kernel size; any
input strides (NCHW or channels_last); fp32 accumulation, fp32 state.

EVAL is the zero-state inference shortcut (python_ref/eval_path.py): the weight holds only
the i, o, g rows, the forget gate is neither loaded nor multiplied, no state is read or
written, and v2's constant recovery share arrives as a (3·Cout, Ho, Wo) map (HAS_MAP).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# The GPU's autotune space. Each tile shape is run in the interpreter against python_ref
# (tests/test_triton_tiles.py) and compiled for sm_90 with its warps and stages
# (tests/test_triton_compile.py).
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (64, 32, 32, 4, 3),
        (128, 32, 32, 4, 3),
        (64, 64, 32, 4, 3),
        (128, 64, 32, 8, 3),
        (128, 64, 64, 8, 3),
        (64, 128, 32, 8, 4),
        (256, 32, 32, 8, 3),
    ]
]


def _configs():
    if INTERPRET:  # the CPU interpreter: one small tile, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    # PTL_FUSED_TRITON_AUTOTUNE=0: the first config only, untuned. For test runs on a GPU, where
    # every odd test shape would otherwise compile and time all of them (scripts/gpu_check.sh).
    return GPU_CONFIGS[:1] if os.environ.get("PTL_FUSED_TRITON_AUTOTUNE") == "0" else GPU_CONFIGS


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    """tanh as csrc/cell_math.h computes it: through exp (2·sigmoid(2v) - 1, the same identity),
    and near 0, where that form's ~1 ulp of 1 is a large relative error, the odd Taylor series
    (its constants are integers, exact in fp64; the fp64 edge is 0.02 rounded to fp32)."""
    far = 2.0 * _sigmoid(2.0 * v) - 1.0
    v2 = v * v
    near = v * (1.0 + v2 * ((v2 * (42.0 - 17.0 * v2) - 105.0) / 315.0))
    if v.dtype == tl.float64:
        edge = 0.02
    else:
        edge = 0.25
    return tl.where(tl.abs(v) < edge, near, far)


@triton.jit
def _gate_dots(
    a, acc_i, acc_f, acc_o, acc_g, w_ptr, w_col, k_mask, offs_n, n_mask, Cout, w_k_stride,
    DOT_PRECISION: tl.constexpr, EVAL: tl.constexpr,
):  # fmt: skip
    """acc_gate += a @ W[gate row + n, w_col]^T for each gate; w_col: (BLOCK_K,) weight columns.

    Gate rows: i, f, o, g at 0, 1, 2, 3 × Cout; in EVAL i, o, g at 0, 1, 2 × Cout (acc_f unused).
    out_dtype: the accumulator's (fp64 for fp64); Triton 3.6 asserts that it equals the default
    (fp32) otherwise, so an fp64 dot would not compile there.
    """
    O_ROW: tl.constexpr = 1 if EVAL else 2
    G_ROW: tl.constexpr = 2 if EVAL else 3
    w_mask = k_mask[:, None] & n_mask[None, :]
    w = w_ptr + offs_n[None, :] * w_k_stride + w_col[:, None]
    w_i = tl.load(w + 0 * Cout * w_k_stride, mask=w_mask, other=0.0)
    w_o = tl.load(w + O_ROW * Cout * w_k_stride, mask=w_mask, other=0.0)
    w_g = tl.load(w + G_ROW * Cout * w_k_stride, mask=w_mask, other=0.0)
    acc_i = tl.dot(a, w_i, acc_i, input_precision=DOT_PRECISION, out_dtype=acc_i.dtype)
    if not EVAL:
        w_f = tl.load(w + 1 * Cout * w_k_stride, mask=w_mask, other=0.0)
        acc_f = tl.dot(a, w_f, acc_f, input_precision=DOT_PRECISION, out_dtype=acc_f.dtype)
    acc_o = tl.dot(a, w_o, acc_o, input_precision=DOT_PRECISION, out_dtype=acc_o.dtype)
    acc_g = tl.dot(a, w_g, acc_g, input_precision=DOT_PRECISION, out_dtype=acc_g.dtype)
    return acc_i, acc_f, acc_o, acc_g


@triton.jit
def _accumulate(
    acc_i, acc_f, acc_o, acc_g, src_ptr, w_ptr, b_idx, oh, ow, m_mask, offs_n, n_mask,
    Cin, H, W, Cout, s_b, s_c, s_h, s_w, w_k_stride, w_k_offset, stride, padding,
    KS: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EVAL: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
):  # fmt: skip
    """acc_gate += im2col(src)[pixels, :] @ W[gate row + n, w_k_offset + :]^T for each gate.

    The K columns come in one of two orders, the weight laid out to match (ops._launch_fwd):
    channel-major (ch, dh, dw), as the weight is stored, where BLOCK_K columns span channels
    and taps together (few idle lanes for Cin = 3); TAP_MAJOR (dh, dw, ch), for channels_last
    with Cin % 64 == 0, where a tap's BLOCK_K consecutive channels are contiguous (s_c = 1), so
    the A loads can be vectorised.
    """
    K = Cin * KS * KS
    if TAP_MAJOR:
        # One flat loop (so it software-pipelines like the other): Cin % 64 == 0, so a chunk of
        # BLOCK_K columns never straddles two taps.
        for k0 in range(0, K, BLOCK_K):
            tap = k0 // Cin
            offs_c = (k0 - tap * Cin) + tl.arange(0, BLOCK_K)
            ih = oh * stride - padding + tap // KS
            iw = ow * stride - padding + tap % KS
            pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = b_idx * s_b + ih * s_h + iw * s_w
            a = tl.load(src_ptr + pix[:, None] + offs_c[None, :], mask=pix_ok[:, None], other=0.0)
            acc_i, acc_f, acc_o, acc_g = _gate_dots(
                a, acc_i, acc_f, acc_o, acc_g, w_ptr, w_k_offset + k0 + tl.arange(0, BLOCK_K), offs_c < Cin,
                offs_n, n_mask, Cout, w_k_stride, DOT_PRECISION, EVAL,
            )  # fmt: skip
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            cin = offs_k // (KS * KS)
            kr = offs_k % (KS * KS)
            ih = oh[:, None] * stride - padding + (kr // KS)[None, :]
            iw = ow[:, None] * stride - padding + (kr % KS)[None, :]
            a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(
                src_ptr + b_idx[:, None] * s_b + cin[None, :] * s_c + ih * s_h + iw * s_w,
                mask=a_mask,
                other=0.0,
            )
            acc_i, acc_f, acc_o, acc_g = _gate_dots(
                a, acc_i, acc_f, acc_o, acc_g, w_ptr, w_k_offset + offs_k, k_mask,
                offs_n, n_mask, Cout, w_k_stride, DOT_PRECISION, EVAL,
            )  # fmt: skip
    return acc_i, acc_f, acc_o, acc_g


@triton.autotune(
    configs=_configs(), key=["Cin", "Cout", "Ho", "Wo", "KS", "V2", "SAVE_GATES", "EVAL", "TAP_MAJOR"]
)
# B unspecialised: Triton would compile again for a batch of 1 or a 16-divisible one (an
# epoch's last batch); it only bounds the pixel mask, where its divisibility buys nothing.
@triton.jit(do_not_specialize=["B"])
def bconv_cell_fwd_kernel(
    x_ptr,
    xr_ptr,
    w_ptr,
    b_ptr,
    cp_ptr,
    hp_ptr,
    alpha_ptr,
    y_ptr,
    cn_ptr,
    hn_ptr,
    gates_ptr,
    map_ptr,
    B,
    Cin,
    H,
    W,
    Cout,
    Ho,
    Wo,
    stride,
    padding,
    sx_b,
    sx_c,
    sx_h,
    sx_w,  # x and X~ (same strides)
    ss_b,
    ss_c,
    ss_h,
    ss_w,  # every state-shaped tensor: c_prev, h_prev, y, c_new, h_new
    sg_b,
    sg_c,
    sg_h,
    sg_w,  # gates (B, 4*Cout, Ho, Wo)
    KS: tl.constexpr,
    V2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_GATES: tl.constexpr,
    EVAL: tl.constexpr,
    HAS_MAP: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    M = B * Ho * Wo
    m_mask = offs_m < M
    n_mask = offs_n < Cout
    b_idx = offs_m // (Ho * Wo)
    hw = offs_m % (Ho * Wo)
    oh = hw // Wo
    ow = hw % Wo

    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    K = Cin * KS * KS
    w_k_stride = 2 * K if V2 else K
    # fmt: off
    acc_i, acc_f, acc_o, acc_g = _accumulate(
        acc_i, acc_f, acc_o, acc_g, x_ptr, w_ptr, b_idx, oh, ow, m_mask, offs_n, n_mask,
        Cin, H, W, Cout, sx_b, sx_c, sx_h, sx_w, w_k_stride, 0, stride, padding,
        KS, BLOCK_K, DOT_PRECISION, EVAL, TAP_MAJOR)
    if V2:  # second K source: the recovered X~, weights W[:, Cin:]
        acc_i, acc_f, acc_o, acc_g = _accumulate(
            acc_i, acc_f, acc_o, acc_g, xr_ptr, w_ptr, b_idx, oh, ow, m_mask, offs_n, n_mask,
            Cin, H, W, Cout, sx_b, sx_c, sx_h, sx_w, w_k_stride, K, stride, padding,
            KS, BLOCK_K, DOT_PRECISION, False, TAP_MAJOR)
    # fmt: on
    O_ROW: tl.constexpr = 1 if EVAL else 2
    G_ROW: tl.constexpr = 2 if EVAL else 3
    if HAS_BIAS:
        acc_i += tl.load(b_ptr + 0 * Cout + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]
        if not EVAL:
            acc_f += tl.load(b_ptr + 1 * Cout + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]
        acc_o += tl.load(b_ptr + O_ROW * Cout + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]
        acc_g += tl.load(b_ptr + G_ROW * Cout + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]

    mask = m_mask[:, None] & n_mask[None, :]
    # The pre-activations are rounded to the compute dtype, as the conv output of the reference.
    out_dtype = y_ptr.dtype.element_ty
    z_i, z_o, z_g = acc_i.to(out_dtype), acc_o.to(out_dtype), acc_g.to(out_dtype)
    if HAS_MAP:  # (3·Cout, Ho, Wo), contiguous; added in the compute dtype like the reference
        m_off = offs_n[None, :] * (Ho * Wo) + hw[:, None]
        z_i += tl.load(map_ptr + m_off, mask=mask, other=0.0)
        z_o += tl.load(map_ptr + Cout * Ho * Wo + m_off, mask=mask, other=0.0)
        z_g += tl.load(map_ptr + 2 * Cout * Ho * Wo + m_off, mask=mask, other=0.0)
    gi = _sigmoid(z_i.to(ACC_DTYPE))
    go = _sigmoid(z_o.to(ACC_DTYPE))
    gg = _tanh(z_g.to(ACC_DTYPE))

    s_off = b_idx[:, None] * ss_b + offs_n[None, :] * ss_c + oh[:, None] * ss_h + ow[:, None] * ss_w
    if EVAL:  # C_{b-1} = 0: C_b = i·g; nothing is read or stored but y
        y = (go * _tanh((gi * gg).to(out_dtype).to(ACC_DTYPE))).to(out_dtype)
        tl.store(y_ptr + s_off, y, mask=mask)
    else:
        gf = _sigmoid(acc_f.to(out_dtype).to(ACC_DTYPE))
        c_prev = tl.load(cp_ptr + s_off, mask=mask, other=0.0).to(ACC_DTYPE)
        c_new = gf * c_prev + gi * gg
        y = (go * _tanh(c_new)).to(out_dtype)
        tl.store(cn_ptr + s_off, c_new.to(cn_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + s_off, y, mask=mask)
    if V2:
        alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
        h_prev = tl.load(hp_ptr + s_off, mask=mask, other=0.0).to(ACC_DTYPE)
        h_new = h_prev + alpha * (y.to(ACC_DTYPE) - h_prev)
        tl.store(hn_ptr + s_off, h_new.to(hn_ptr.dtype.element_ty), mask=mask)
    if SAVE_GATES:
        g_off = b_idx[:, None] * sg_b + offs_n[None, :] * sg_c + oh[:, None] * sg_h + ow[:, None] * sg_w
        gstep = Cout * sg_c
        tl.store(gates_ptr + g_off, gi.to(out_dtype), mask=mask)
        tl.store(gates_ptr + g_off + gstep, gf.to(out_dtype), mask=mask)
        tl.store(gates_ptr + g_off + 2 * gstep, go.to(out_dtype), mask=mask)
        tl.store(gates_ptr + g_off + 3 * gstep, gg.to(out_dtype), mask=mask)
