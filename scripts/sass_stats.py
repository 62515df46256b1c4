"""Static machine-code figures of the CUDA kernels, for sessions without a GPU.

Compiles a .cu file for one architecture with nvcc, reads ptxas's resource report and the
SASS (cuobjdump, bundled with Triton), and prints per kernel: registers, spills, stack and
shared memory, and for tensor-core kernels the innermost loop that holds every HMMA (the
implicit GEMM's K step): its instruction count and its global loads, shared stores, HMMAs
and calls. These are static counts, not timings: a loop body without inner branches back is
also the dynamic count of one K step.

    python scripts/sass_stats.py [csrc/cuda/fused_gemm.cu] [--arch sm_90]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.utils.cpp_extension as cpp

ROOT = Path(__file__).resolve().parents[1]
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


def cuobjdump() -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if not tool.exists():
        sys.exit(f"cuobjdump not found at {tool}")
    return str(tool)


def compile_cubin(source: Path, arch: str, out: Path) -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("nvcc not found on PATH")
    includes = cpp.include_paths("cuda") + [str(ROOT / "csrc")]
    try:  # torch's CUDA wheels carry headers some toolkits lack (cusparse.h)
        import nvidia

        includes += [str(p) for base in nvidia.__path__ for p in Path(base).glob("*/include")]
    except ImportError:
        pass
    cmd = [nvcc, "-std=c++20", "-O3", f"-arch={arch}", "-cubin", "--expt-relaxed-constexpr"]
    cmd += ["-Xptxas", "-v", *(f"-I{i}" for i in includes), str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-4000:])
    return done.stderr


def resources(ptxas_log: str) -> dict[str, str]:
    """kernel -> 'regs R, spill S B, stack K B, smem M B' from ptxas -v."""
    out, name = {}, None
    for line in ptxas_log.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)):
            out[name] = f"stack {m.group(1)} B, spill {m.group(2)} B"
        elif name and (m := re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)):
            out[name] = f"regs {m.group(1)}, {out.get(name, '')}, smem {m.group(2)} B"
    return out


def k_loop(instrs: list[tuple[int, str]]) -> str:
    mma = [a for a, t in instrs if "HMMA" in t]
    if not mma:
        return ""
    loops = []
    for a, t in instrs:
        if (m := BRANCH.search(t)) and int(m.group(1), 16) < a:
            start = int(m.group(1), 16)
            if start <= mma[0] and mma[-1] <= a:
                loops.append((a - start, start, a))
    if not loops:
        return "no loop holds every HMMA"
    _, start, end = min(loops)
    body = [t for a, t in instrs if start <= a <= end]
    inner = sum(
        1 for a, t in instrs if start <= a < end and (m := BRANCH.search(t)) and int(m.group(1), 16) < a
    )
    count = {op: sum(op in t for t in body) for op in ("LDG", "STS", "HMMA", "CALL")}
    figures = ", ".join(f"{op} {n}" for op, n in count.items())
    return f"K loop {len(body)} instructions ({figures}; inner loops {inner})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", default=str(ROOT / "csrc/cuda/fused_gemm.cu"))
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        res = resources(compile_cubin(Path(args.source), args.arch, cubin))
        sass = subprocess.run(
            [cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        instrs = [(int(a, 16), t) for a, t in INSTR.findall(block)]
        print(f"{name}\n    {len(instrs)} instructions; {res.get(name, '?')}")
        if loop := k_loop(instrs):
            print(f"    {loop}")


if __name__ == "__main__":
    main()
