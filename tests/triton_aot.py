"""Compile the Triton backend's kernels for a GPU with Triton's real compiler, on any machine.

Without a GPU the tests run the kernels in Triton's interpreter, which never compiles them: a
construct the compiler rejects (a dot shape, a dtype, a constexpr misuse) would surface only
on a GPU. This script records the launches the backend's ops make (their arguments, without
running anything), then compiles each distinct one ahead of time for sm_90 (TTIR -> PTX ->
cubin with the bundled ptxas): for bf16, the benchmark dtype, under every autotune config the
GPU would try; for fp16/fp32/fp64 and kernel sizes 1 and 5 under the first one.

    python tests/triton_aot.py [--arch 90] [--jobs N]      (TRITON_INTERPRET must be unset)

Prints one JSON line per compile ({"kernel", "variant", "config", "shared", "mma", "error"})
and exits 1 if any failed. Run by tests/test_triton_compile.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot.py compiles for a GPU: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ptl_fused.triton.ops as tops  # noqa: E402

KERNELS = ("bconv_cell_fwd_kernel", "recovery_kernel", "bconv_cell_bwd_kernel")
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
MAX_SHARED = 227 * 1024  # the most shared memory a Hopper block may use


def record_launches() -> list[tuple[str, object, tuple, dict]]:
    """(variant, kernel, args, kwargs) of every launch the ops make over the variant matrix."""
    launches: list[tuple[str, object, tuple, dict]] = []
    variant = [""]

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((variant[0], self.kernel, args, kwargs))

    for name in KERNELS:
        setattr(tops, name, Recorder(getattr(tops, name)))

    def run(label, dtype, k=3, channels_last=False):
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def t(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(dt).contiguous(memory_format=fmt)

        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        pad = k // 2  # "same" output: every state is (2, 16, 9, 9)
        x, w, b = t(2, 16, 9, 9), t(64, 16, k, k), torch.randn(64, generator=g).to(dtype)
        w2, wr, br = t(64, 32, k, k), t(16, 16, k, k), torch.randn(16, generator=g).to(dtype)
        c, h = t(2, 16, 9, 9, dt=sdt), t(2, 16, 9, 9, dt=sdt)
        alpha = torch.tensor(0.5)
        w3, gate_map = t(48, 16, k, k), torch.randn(48, 9, 9, generator=g).to(dtype)
        calls = {
            "v1 train": lambda: tops.bconv_cell_fwd(x, w, b, c, 1, pad, True),
            "v1 no-grad": lambda: tops.bconv_cell_fwd(x, w, None, c, 1, pad, False),
            "v2 train": lambda: tops.bconv_cell_v2_fwd(x, w2, b, wr, br, c, h, alpha, 1, pad, True),
            "v2 no-grad": lambda: tops.bconv_cell_v2_fwd(x, w2, None, wr, None, c, h, alpha, 1, pad, False),
            "eval v1": lambda: tops.bconv_cell_eval_op(x, w3, b[:48], None, 1, pad),
            "eval v2": lambda: tops.bconv_cell_eval_op(x, w3, None, gate_map, 1, pad),
        }
        gates = t(2, 64, 9, 9)
        for name, grads in {"bwd v1": (x[:, :16], c, None), "bwd v1 dy": (x[:, :16], None, None)}.items():
            calls[name] = lambda grads=grads: tops.bconv_cell_bwd(*grads, c, gates, None)
        for name, grads in {"bwd v2": (x[:, :16], c, h), "bwd v2 dc": (None, c, None)}.items():
            calls[name] = lambda grads=grads: tops.bconv_cell_bwd(*grads, c, gates, alpha)
        for name, call in calls.items():
            variant[0] = f"{label} {name}"
            call()

    for dtype in POINTER:
        run(str(dtype).removeprefix("torch."), dtype)
    run("bfloat16 k1 channels_last", torch.bfloat16, k=1, channels_last=True)
    run("bfloat16 k5", torch.bfloat16, k=5)
    return launches


def jit_function(kernel) -> triton.JITFunction:
    """The kernel itself, or the one an autotuner wraps."""
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def signature(kernel, args: tuple, kwargs: dict, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch, typed as Triton's launcher types it."""
    fn = jit_function(kernel)
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    options = {}
    if config is not None:
        values |= config.kwargs
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    constexpr = {fn.arg_names[i] for i in fn.constexprs}
    sig, consts = {}, {}
    for name in fn.arg_names:
        v = values[name]
        if name in constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = POINTER[v.dtype]
        else:
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
    return sig, consts, options


def distinct_compiles(launches) -> list[tuple]:
    """(variant, kernel, config, signature, constexprs, options) per distinct compile."""
    seen, out = set(), []
    for variant, kernel, args, kwargs in launches:
        configs = getattr(kernel, "configs", [None])
        if not variant.startswith("bfloat16 v") and not variant.startswith("bfloat16 eval"):
            configs = configs[:1]
        for config in configs:
            sig, consts, options = signature(kernel, args, kwargs, config)
            key = (id(kernel), tuple(sig.items()), repr(sorted(consts.items())), repr(options))
            if key not in seen:
                seen.add(key)
                out.append((variant, kernel, config, sig, consts, options))
    return out


COMPILES: list = []
ARCH = [90]


def compile_one(i: int) -> dict:
    variant, kernel, config, sig, consts, options = COMPILES[i]
    fn = jit_function(kernel)
    row = {"kernel": fn.__name__, "variant": variant, "config": str(config) if config else "default"}
    row["configs"] = len(getattr(kernel, "configs", [None]))  # how many the GPU autotunes over
    start = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", ARCH[0], 32), options=options)
        ptx, row["shared"] = k.asm["ptx"], k.metadata.shared
        row["mma"] = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else None)
        too_big = k.metadata.shared > MAX_SHARED
        row["error"] = f"needs {k.metadata.shared} B of shared memory" if too_big else None
    except Exception as e:  # the message shows the kernel line; the cause says what failed there
        cause = e.__cause__
        where = traceback.extract_tb(cause.__traceback__)[-1] if cause and cause.__traceback__ else None
        row["error"] = f"{type(e).__name__}: {str(e)[-1500:]}" + (
            f"\ncaused by {cause!r} at {where.filename}:{where.lineno}" if where else ""
        )
    row["seconds"] = round(time.time() - start, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = parser.parse_args()
    ARCH[0] = a.arch
    COMPILES.extend(distinct_compiles(record_launches()))
    failed = 0
    # fork: the workers inherit COMPILES (JIT functions do not pickle by value)
    with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
        for row in pool.imap_unordered(compile_one, range(len(COMPILES))):
            failed += row["error"] is not None
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
