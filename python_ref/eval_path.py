"""The inference shortcut of DESIGN.md §5 in plain PyTorch: the oracle of every eval kernel.

Eval starts every batch from the zero state, so C_b = f·0 + i·g: the forget gate is never
needed (a quarter of the gate convolution) and no state is read. In v2, H_{b-1} = 0 makes the
recovery X~ = conv_transpose(0) + bias_rec a per-channel constant, so its share of the gate
convolution is a fixed (3·Cout, Ho, Wo) map, computed once per weight version (it differs
only at the borders, where zero padding cuts the constant). v2 eval then costs what v1 does.
Tests check these against bconv_cell / bconv_cell_v2 with zero states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bconv_cell import state_dtype


def eval_gate_rows(t: Tensor) -> Tensor:
    """Rows i, o, g (the forget gate dropped) of a (4·Cout, ...) gate weight or bias -> (3·Cout, ...)."""
    i, _, o, g = t.chunk(4, dim=0)
    return torch.cat([i, o, g])


def v2_gate_map(
    weight: Tensor,
    bias: Tensor | None,
    bias_rec: Tensor | None,
    size: tuple[int, int],
    stride: int,
    padding: int,
) -> Tensor:
    """(3·Cout, Ho, Wo): what the constant X~ (bias_rec, or 0) and the gate bias add to the
    i, o, g pre-activations of a v2 cell whose input has spatial `size` (H, W)."""
    cin = weight.shape[1] // 2
    const = bias_rec if bias_rec is not None else weight.new_zeros(cin)
    x_rec = const.to(weight.dtype).view(1, cin, 1, 1).expand(1, cin, *size)
    rows_bias = None if bias is None else eval_gate_rows(bias)
    return F.conv2d(x_rec, eval_gate_rows(weight[:, cin:]), rows_bias, stride, padding)[0]


def bconv_cell_eval(
    x: Tensor,
    weight3: Tensor,
    bias3: Tensor | None,
    gate_map: Tensor | None,
    stride: int = 1,
    padding: int = 0,
) -> Tensor:
    """y (B, Cout, Ho, Wo) of a cell from the zero state.

    weight3 (3·Cout, Cin, k, k) and bias3 are the i, o, g rows (eval_gate_rows); for v2,
    weight3 holds only the x columns and gate_map = v2_gate_map(...) (its bias included).
    """
    z = F.conv2d(x, weight3, bias3, stride, padding)
    if gate_map is not None:
        z = z + gate_map.to(z.dtype)
    i, o, g = z.chunk(3, dim=1)
    c = (torch.sigmoid(i) * torch.tanh(g)).to(state_dtype(z.dtype))  # C_b from C_{b-1} = 0
    return (torch.sigmoid(o) * torch.tanh(c)).to(z.dtype)
