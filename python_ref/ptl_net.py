"""Reference of the PTL network forward (DESIGN.md §1): the formula, one step per line.

x^0 = image;  x^i = stages[i-1](x^{i-1})                        i = 1..K
y^0 = cells[0](x^0)
y^i = cells[i](fuses[i-1](cat[x^i, y^{i-1}]))                    i = 1..K-1
feature map = final_fuse(cat[y^{K-1}, x^K])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def ptl_forward(
    stages: Sequence[nn.Module],
    cells: Sequence[nn.Module],
    fuses: Sequence[nn.Module],
    final_fuse: nn.Module,
    x: Tensor,
) -> Tensor:
    """image x (B, Cin, H, W) -> feature map (B, D, H_K, W_K); len(cells) == len(stages) == K."""
    K = len(stages)
    xs = [x]  # x^0 .. x^K
    for i in range(1, K + 1):
        xs.append(stages[i - 1](xs[i - 1]))
    ys = [cells[0](xs[0])]  # y^0 .. y^{K-1}
    for i in range(1, K):
        ys.append(cells[i](fuses[i - 1](torch.cat([xs[i], ys[i - 1]], dim=1))))
    return final_fuse(torch.cat([ys[K - 1], xs[K]], dim=1))
