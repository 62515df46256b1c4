"""The benchmark shape table and its roofline accounting (DESIGN.md §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    cin: int
    cout: int
    h: int
    w: int
    k: int = 3
    stride: int = 1
    padding: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((n + 2 * self.padding - self.k) // self.stride + 1 for n in (self.h, self.w))

    def describe(self) -> str:
        return (
            f"B{self.batch} {self.cin}->{self.cout} {self.h}x{self.w} k{self.k}s{self.stride}p{self.padding}"
        )

    def flops(self, v2: bool) -> int:
        """Forward FLOPs: the gate conv (v2: over 2·Cin) plus v2's recovery."""
        ho, wo = self.out_hw
        pixels = self.batch * ho * wo
        cin_gate = 2 * self.cin if v2 else self.cin
        gate = 2 * pixels * 4 * self.cout * cin_gate * self.k**2
        recovery = 2 * pixels * self.cout * self.cin * self.k**2 if v2 else 0
        return gate + recovery

    def bytes(self, v2: bool, dtype: torch.dtype) -> int:
        """Forward compulsory traffic: x, weights, C_prev, C_new, y (+ v2: H_prev, H_new)."""
        e = torch.finfo(dtype).bits // 8
        s = 8 if dtype == torch.float64 else 4  # the state dtype
        ho, wo = self.out_hw
        state = self.batch * self.cout * ho * wo
        x = self.batch * self.cin * self.h * self.w
        cin_gate = 2 * self.cin if v2 else self.cin
        weights = 4 * self.cout * cin_gate * self.k**2 + (self.cout * self.cin * self.k**2 if v2 else 0)
        total = (x + weights + state) * e + 2 * state * s
        return total + (2 * state * s if v2 else 0)

    def eval_flops(self) -> int:
        """FLOPs of the eval shortcut, v1 and v2 alike: the i, o, g rows of the gate conv over x."""
        ho, wo = self.out_hw
        return 2 * self.batch * ho * wo * 3 * self.cout * self.cin * self.k**2

    def eval_bytes(self, dtype: torch.dtype) -> int:
        """Compulsory traffic of the eval shortcut: x, the i, o, g weights over x, y."""
        e = torch.finfo(dtype).bits // 8
        ho, wo = self.out_hw
        x = self.batch * self.cin * self.h * self.w
        return (x + 3 * self.cout * self.cin * self.k**2 + self.batch * self.cout * ho * wo) * e


# The foundation table: the PTL networks' cells, k3 p1.
TABLE = [
    Shape("image", 32, 3, 16, 256, 128),
    Shape("c64", 32, 64, 64, 64, 32),
    Shape("c128", 32, 128, 128, 32, 16),
    Shape("c256", 32, 256, 256, 16, 8),
    Shape("c512", 32, 512, 512, 8, 4),
    Shape("cifar", 64, 64, 64, 32, 32),
]

# The authors' MGN-PTL cells at 384x128, batch 16 (4 ids x 4 images); DESIGN.md §1.
MGN = [
    Shape("mgn1", 16, 3, 16, 384, 128, stride=2),
    Shape("mgn2", 16, 16, 32, 192, 64, stride=2),
    Shape("mgn3", 16, 64, 64, 96, 32),
    Shape("mgn4", 16, 128, 256, 96, 32, stride=2),
    Shape("mgn5", 16, 256, 512, 48, 16, stride=2),
    Shape("mgn6", 16, 512, 128, 24, 8, stride=2),
    Shape("mgn7", 16, 512, 128, 24, 8),
]

SETS = {"table": TABLE, "mgn": MGN, "all": TABLE + MGN}

# Dense peak (FLOP/s) and bandwidth (B/s) for the roofline column, by device name.
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
