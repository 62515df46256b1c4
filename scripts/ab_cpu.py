"""Interleaved A/B of the cpu backend against eager python_ref on the bench shape table:
forward and forward+backward, v1 and v2, alternating the two every round.

pytest-benchmark times all rounds of one implementation, then the next; on a small shared
machine the process state drifts between them (glibc raises its mmap threshold as big
buffers are freed, so the same 32 MB allocation page-faults early and not later), which moves
rows by +-15%. Alternating cancels that drift. Run: python scripts/ab_cpu.py [OUT.md]
(fastest of 9 alternating rounds per pair, fp32).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import python_ref  # noqa: E402
from ptl_fused import ops  # noqa: E402

from shapes import TABLE  # noqa: E402


def pair(shape, v2: bool):
    g = torch.Generator().manual_seed(0)
    s = shape
    cin = 2 * s.cin if v2 else s.cin
    x = torch.randn(s.batch, s.cin, s.h, s.w, generator=g).requires_grad_()
    w = (torch.randn(4 * s.cout, cin, s.k, s.k, generator=g) * (cin * s.k**2) ** -0.5).requires_grad_()
    state = torch.randn(s.batch, s.cout, *s.out_hw, generator=g) * 0.5
    leaves = [x, w]
    args = [x, w, None, state, s.stride, s.padding]
    if v2:
        wr = (torch.randn(s.cout, s.cin, s.k, s.k, generator=g) * (s.cout * s.k**2) ** -0.5).requires_grad_()
        leaves.append(wr)
        args = [x, w, None, wr, None, state, state.clone(), 0.5, s.stride, s.padding]
    ref = python_ref.bconv_cell_v2 if v2 else python_ref.bconv_cell
    op = ops.bconv_cell_v2 if v2 else ops.bconv_cell
    fns = {"eager": lambda: ref(*args), "cpu": lambda: op(*args, backend="cpu")}
    gy = torch.randn(s.batch, s.cout, *s.out_hw, generator=g)

    def fwd(f):
        with torch.no_grad():
            f()

    def fwd_bwd(f):
        torch.autograd.grad(f()[0], leaves, gy)

    return fns, {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main(out: str | None = None) -> None:
    lines = [
        f"# Interleaved A/B, cpu backend vs eager python_ref ({torch.get_num_threads()} threads, fp32)",
        "",
        "| shape | cell | pass | eager ms | cpu ms | x eager |",
        "|---|---|---|---|---|---|",
    ]
    for shape in TABLE:
        for v2 in (False, True):
            fns, passes = pair(shape, v2)
            for pass_name, run in passes.items():
                times = {k: [] for k in fns}
                for f in fns.values():
                    run(f)
                for _ in range(9):
                    for name, f in fns.items():
                        start = time.perf_counter()
                        run(f)
                        times[name].append(time.perf_counter() - start)
                e, c = min(times["eager"]) * 1e3, min(times["cpu"]) * 1e3
                cell = "v2" if v2 else "v1"
                row = f"| {shape.describe()} | {cell} | {pass_name} | {e:.1f} | {c:.1f} | {e / c:.2f} |"
                print(row, flush=True)
                lines.append(row)
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
