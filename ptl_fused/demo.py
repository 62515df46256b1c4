"""A two-minute tour: a PTL cell carrying its state across batches, and backend timings.

Run: python -m ptl_fused.demo
"""

from __future__ import annotations

import time

import torch

import python_ref
from ptl_fused import BConvCell, BConvCellV2, available_backends, ops, reset_states


def _time(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    print(f"ptl_fused backends available here: {available_backends()}\n")

    cell = BConvCell(3, 16, kernel_size=3, padding=1)  # the image cell of a PTL network
    print("Training mode: the latent state C_b carries from one mini-batch to the next.")
    for b, batch in enumerate([8, 8, 6], start=1):
        y = cell(torch.randn(batch, 3, 64, 32))
        print(
            f"  batch {b}: x ({batch}, 3, 64, 32) -> y {tuple(y.shape)}, "
            f"mean |C_b| = {cell.state.abs().mean():.4f}"
        )
    reset_states(cell)
    print("  reset_states(model) at the epoch start -> state is", cell.state)
    cell.eval()
    x = torch.randn(4, 3, 64, 32)
    same = torch.allclose(cell(x), torch.cat([cell(x[i : i + 1]) for i in range(4)]), atol=1e-6)
    print(f"Eval mode: every batch starts fresh, so features ignore batch size/order: {same}\n")

    v2 = BConvCellV2(3, 16, padding=1)
    for _ in range(3):
        v2(torch.randn(8, 3, 64, 32))
    print(
        f"BConv-Cell-v2 keeps (C_b, H_b); H_b is the running mean of the outputs of "
        f"{v2.num_batches.item()} batches since the last reset.\n"
    )

    shape = dict(batch=16, cin=64, cout=64, h=32, w=16)
    x = torch.randn(shape["batch"], shape["cin"], shape["h"], shape["w"], requires_grad=True)
    w = (torch.randn(4 * shape["cout"], shape["cin"], 3, 3) * 0.05).requires_grad_()
    c = torch.zeros(shape["batch"], shape["cout"], shape["h"], shape["w"])
    print(f"Forward+backward of one cell, B16 64->64 32x16 fp32, on {torch.get_num_threads()} CPU threads:")

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, w, None, c, 1, 1)[0].sum(), [x, w])

    t_ref = _time(step(python_ref.bconv_cell))
    print(f"  {'python_ref (eager)':<20} {t_ref * 1e3:8.2f} ms")
    for name in available_backends():
        if name == "reference":
            continue
        t = _time(step(lambda *a, name=name: ops.bconv_cell(*a, backend=name)))
        print(f"  {name:<20} {t * 1e3:8.2f} ms  ({t_ref / t:.2f}x eager)")
    print("\nFull tables: pytest bench/ --benchmark-json=bench/results/<name>.json (see README).")


if __name__ == "__main__":
    main()
