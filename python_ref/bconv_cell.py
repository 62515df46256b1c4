"""The oracle: BConv-Cell (v1) and BConv-Cell-v2 in plain PyTorch (DESIGN.md §1, §4).

Slow and obvious on purpose: every backend of ``ptl_fused`` is tested against these
functions. Shapes: x (B, Cin, H, W); weight (4·Cout, Cin[·2 for v2], k, k);
states (B, Cout, Ho, Wo). Gate order along dim 1 is input, forget, output, cell.

Dtypes: the convolutions and gates run in the compute dtype (x's, or autocast's);
the states are float32, or float64 when the compute dtype is float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def state_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a cell's state is kept in: float32, unless the cell computes in float64."""
    return torch.promote_types(compute_dtype, torch.float32)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Ho (or Wo) of the gate convolution, and of the state, for an input size H (or W)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def output_padding(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """output_padding of v2's recovery, so conv_transpose gives back x's spatial size."""
    return (size + 2 * padding - kernel_size) % stride


def _gates_and_state(z: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    i, f, o, g = z.chunk(4, dim=1)
    i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
    c_new = f * c_prev + i * g  # c_prev carries the state dtype into c_new
    y = (o * torch.tanh(c_new)).to(z.dtype)
    return y, c_new


def bconv_cell(
    x: Tensor, weight: Tensor, bias: Tensor | None, c_prev: Tensor, stride: int = 1, padding: int = 0
) -> tuple[Tensor, Tensor]:
    """BConv-Cell: Z = conv(x); C_b = f·C_{b-1} + i·g; y = o·tanh(C_b). Returns (y, C_b)."""
    z = F.conv2d(x, weight, bias, stride, padding)
    return _gates_and_state(z, c_prev)


def bconv_cell_v2(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_rec: Tensor,
    bias_rec: Tensor | None,
    c_prev: Tensor,
    h_prev: Tensor,
    h_alpha: float | Tensor,
    stride: int = 1,
    padding: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """BConv-Cell-v2: recover X~ from H_{b-1}, gate conv over [x, X~], aggregate H.

    Returns (y, C_b, H_b) with H_b = H_{b-1} + h_alpha·(y − H_{b-1}).
    """
    k = weight.shape[-1]
    op = [output_padding(n, k, stride, padding) for n in x.shape[-2:]]
    x_rec = F.conv_transpose2d(h_prev.to(x.dtype), weight_rec, bias_rec, stride, padding, op)
    z = F.conv2d(torch.cat([x, x_rec.to(x.dtype)], dim=1), weight, bias, stride, padding)
    y, c_new = _gates_and_state(z, c_prev)
    h_new = h_prev + h_alpha * (y - h_prev)
    return y, c_new, h_new
