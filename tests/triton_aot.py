"""Compile the Triton backend's kernels for a GPU with Triton's real compiler, on any machine.

Without a GPU the tests run the kernels in Triton's interpreter, which never compiles them: a
construct the compiler rejects (a dot shape, a dtype, a constexpr misuse) would surface only
on a GPU. This script records the launches the backend's ops make (their arguments, without
running anything), then compiles each distinct one ahead of time for sm_90 (TTIR -> PTX ->
cubin with the bundled ptxas), specialised by the JIT launcher's own code (16-divisible
pointers and ints marked, ints equal to 1 made constexprs): for bf16, the benchmark dtype,
under every autotune config the GPU would try; for fp16/fp32/fp64, channels_last and kernel
sizes 1 and 5 under the first one. The compiler is this machine's Triton: CI's 3.8, and the
GPU machine's 3.6 in a check by hand (torch 2.11 venv), both passing.

    python tests/triton_aot.py [--arch 90] [--jobs N]      (TRITON_INTERPRET must be unset)
    python tests/triton_aot.py --batch-specialisations    (compiles nothing: recompiles per batch size)

Prints one JSON line per compile ({"kernel", "variant", "config", "configs", "shared", "mma",
"reads", "error", "seconds"}) and exits 1 if any failed. Run by tests/test_triton_compile.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections import Counter

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot.py compiles for a GPU: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402  (the JIT launcher's typing)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ptl_fused.triton.ops as tops  # noqa: E402

KERNELS = ("bconv_cell_fwd_kernel", "recovery_kernel", "bconv_cell_bwd_kernel")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_SHARED = 227 * 1024  # the most shared memory a Hopper block may use


def record_launches(batch: int = 2) -> list[tuple[str, object, tuple, dict]]:
    """(variant, kernel, args, kwargs) of every launch the ops make over the variant matrix."""
    launches: list[tuple[str, object, tuple, dict]] = []
    variant = [""]

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((variant[0], self.kernel, args, kwargs))

    kernels = {name: getattr(tops, name) for name in KERNELS}
    for name, kernel in kernels.items():
        setattr(tops, name, Recorder(kernel))

    def run(label, dtype, k=3, channels_last=False, cin=16):
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def t(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(dt).contiguous(memory_format=fmt)

        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        pad = k // 2  # "same" output: every state is (batch, 16, 9, 9)
        x, w, b = t(batch, cin, 9, 9), t(64, cin, k, k), torch.randn(64, generator=g).to(dtype)
        w2, wr, br = t(64, 2 * cin, k, k), t(16, cin, k, k), torch.randn(16, generator=g).to(dtype)
        c, h = t(batch, 16, 9, 9, dt=sdt), t(batch, 16, 9, 9, dt=sdt)
        alpha = torch.tensor(0.5)
        w3, gate_map = t(48, cin, k, k), torch.randn(48, 9, 9, generator=g).to(dtype)
        calls = {
            "v1 train": lambda: tops.bconv_cell_fwd(x, w, b, c, 1, pad, True),
            "v1 no-grad": lambda: tops.bconv_cell_fwd(x, w, None, c, 1, pad, False),
            "v2 train": lambda: tops.bconv_cell_v2_fwd(x, w2, b, wr, br, c, h, alpha, 1, pad, True),
            "v2 no-grad": lambda: tops.bconv_cell_v2_fwd(x, w2, None, wr, None, c, h, alpha, 1, pad, False),
            "eval v1": lambda: tops.bconv_cell_eval_op(x, w3, b[:48], None, 1, pad),
            "eval v2": lambda: tops.bconv_cell_eval_op(x, w3, None, gate_map, 1, pad),
        }
        gates, gy = t(batch, 64, 9, 9), t(batch, 16, 9, 9)  # gy: the gradient of y (dtype), dC/dH (fp32)
        for name, grads in {"bwd v1": (gy, c, None), "bwd v1 dy": (gy, None, None)}.items():
            calls[name] = lambda grads=grads: tops.bconv_cell_bwd(*grads, c, gates, None)
        for name, grads in {"bwd v2": (gy, c, h), "bwd v2 dc": (None, c, None)}.items():
            calls[name] = lambda grads=grads: tops.bconv_cell_bwd(*grads, c, gates, alpha)
        # 5 channels: N = batch·5·81 elements, whose 16-divisibility follows the batch size
        gates5, c5 = t(batch, 20, 9, 9), t(batch, 5, 9, 9, dt=sdt)
        calls["bwd v1 5 channels"] = lambda: tops.bconv_cell_bwd(c5.to(dtype), c5, None, c5, gates5, None)
        for name, call in calls.items():
            variant[0] = f"{label} {name}"
            call()

    try:
        for dtype in DTYPES:
            run(str(dtype).removeprefix("torch."), dtype)
        # 64 channels: the tap-major K order (ops._launch_fwd)
        run("bfloat16 channels_last", torch.bfloat16, channels_last=True, cin=64)
        run("bfloat16 k1 channels_last", torch.bfloat16, k=1, channels_last=True, cin=64)
        run("bfloat16 k5", torch.bfloat16, k=5)
    finally:
        for name, kernel in kernels.items():
            setattr(tops, name, kernel)
    return launches


def jit_function(kernel) -> triton.JITFunction:
    """The kernel itself, or the one an autotuner wraps."""
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def signature(kernel, args: tuple, kwargs: dict, config) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one launch, specialised by Triton's own
    launcher code: pointer and int types, ints of 16-divisible value or address marked
    (tt.divisibility), an int equal to 1 and None turned into constexprs."""
    fn = jit_function(kernel)
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    options = {}
    if config is not None:
        values |= config.kwargs
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    sig, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        v = values[param.name]
        if param.is_constexpr:
            sig[param.name], consts[param.name] = "constexpr", v
            continue
        specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
        kind, spec = native_specialize_impl(CUDABackend, v, param.is_const, specialize, align)
        sig[param.name] = kind
        if kind == "constexpr":
            consts[param.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return sig, consts, attrs, options


def batch_specialisations(batches=(1, 2, 3, 16, 17, 32)) -> dict[tuple[str, str], int]:
    """(kernel, variant) -> how many compiles the launcher would make over these batch sizes,
    under the first config: 1 unless a batch-derived int argument is specialised (== 1, or
    16-divisible), which would recompile as the batch size changes (e.g. an epoch's last batch)."""
    keys: dict[tuple[str, str], set] = {}
    for batch in batches:
        for variant, kernel, args, kwargs in record_launches(batch):
            config = getattr(kernel, "configs", [None])[0]
            key = repr(signature(kernel, args, kwargs, config)[:3])
            keys.setdefault((jit_function(kernel).__name__, variant), set()).add(key)
    return {name: len(k) for name, k in keys.items()}


def distinct_compiles(launches) -> list[tuple]:
    """(variant, kernel, config, signature, constexprs, attrs, options) per distinct compile."""
    seen, out = set(), []
    for variant, kernel, args, kwargs in launches:
        configs = getattr(kernel, "configs", [None])
        if not variant.startswith("bfloat16 v") and not variant.startswith("bfloat16 eval"):
            configs = configs[:1]
        for config in configs:
            sig, consts, attrs, options = signature(kernel, args, kwargs, config)
            key = (id(kernel), repr(sig), repr(sorted(consts.items())), repr(attrs), repr(options))
            if key not in seen:
                seen.add(key)
                out.append((variant, kernel, config, sig, consts, attrs, options))
    return out


LD_GLOBAL = re.compile(r"ld\.global\S*")
CP_ASYNC = re.compile(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)")  # dst, src, bytes


def global_reads(ptx: str) -> dict[str, int]:
    """Global-memory read instructions in the PTX by kind: ld.global.<type> (to registers) and
    cp.async.<bytes> (copies to shared memory: how a pipelined dot operand arrives)."""
    kinds = LD_GLOBAL.findall(ptx) + [f"cp.async.{int(n, 0)}" for n in CP_ASYNC.findall(ptx)]
    return dict(sorted(Counter(kinds).items()))


COMPILES: list = []
ARCH = [90]


def compile_one(i: int) -> dict:
    variant, kernel, config, sig, consts, attrs, options = COMPILES[i]
    fn = jit_function(kernel)
    row = {"kernel": fn.__name__, "variant": variant, "config": str(config) if config else "default"}
    row["configs"] = len(getattr(kernel, "configs", [None]))  # how many the GPU autotunes over
    start = time.time()
    try:
        src = ASTSource(fn, sig, consts, attrs)
        k = triton.compile(src, target=GPUTarget("cuda", ARCH[0], 32), options=options)
        ptx, row["shared"] = k.asm["ptx"], k.metadata.shared
        row["mma"] = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else None)
        row["reads"] = global_reads(ptx)
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
    parser.add_argument(
        "--batch-specialisations",
        action="store_true",
        help="compile nothing; print how many compiles each launch needs over batch sizes 1-32",
    )
    a = parser.parse_args()
    if a.batch_specialisations:
        for (kernel, variant), n in batch_specialisations().items():
            print(json.dumps({"kernel": kernel, "variant": variant, "compiles": n}))
        return 0
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
