"""Triton recovery of BConv-Cell-v2: X~ = conv_transpose2d(H_{b-1}, W_rec, b_rec) as an
implicit GEMM (M = B·H·W recovered pixels, N = Cin, K = Cout·k·k).

Reference: the conv_transpose2d line of python_ref.bconv_cell_v2 (H_{b-1} is rounded to the
compute dtype first, as there; output_padding follows from x's size, so X~ has x's shape).
Each recovered pixel gathers the state positions whose stride-s footprint covers it, so
the kernel needs no col2im scatter and no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import _configs


@triton.autotune(configs=_configs(), key=["Cout", "Cin", "H", "W", "KS"])
@triton.jit(do_not_specialize=["B"])  # no recompile per batch size (forward.py)
def recovery_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    B,
    Cout,
    Ho,
    Wo,
    Cin,
    H,
    W,
    stride,
    padding,
    sh_b,
    sh_c,
    sh_h,
    sh_w,  # H_{b-1} (B, Cout, Ho, Wo)
    so_b,
    so_c,
    so_h,
    so_w,  # X~ (B, Cin, H, W)
    KS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
    m_mask = offs_m < B * H * W
    n_mask = offs_n < Cin
    b_idx = offs_m // (H * W)
    ih = (offs_m % (H * W)) // W
    iw = offs_m % W
    out_dtype = out_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    K = Cout * KS * KS
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        co = offs_k // (KS * KS)
        kr = offs_k % (KS * KS)
        th = ih[:, None] + padding - (kr // KS)[None, :]
        tw = iw[:, None] + padding - (kr % KS)[None, :]
        oh = th // stride
        ow = tw // stride
        valid = (th >= 0) & (tw >= 0) & (th % stride == 0) & (tw % stride == 0) & (oh < Ho) & (ow < Wo)
        a_mask = m_mask[:, None] & k_mask[None, :] & valid
        a = tl.load(
            h_ptr + b_idx[:, None] * sh_b + co[None, :] * sh_c + oh * sh_h + ow * sh_w, mask=a_mask, other=0.0
        ).to(out_dtype)
        w = tl.load(
            w_ptr + co[:, None] * (Cin * KS * KS) + offs_n[None, :] * (KS * KS) + kr[:, None],
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)  # see forward.py
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)[None, :]
    o_off = b_idx[:, None] * so_b + offs_n[None, :] * so_c + ih[:, None] * so_h + iw[:, None] * so_w
    tl.store(out_ptr + o_off, acc.to(out_dtype), mask=m_mask[:, None] & n_mask[None, :])
