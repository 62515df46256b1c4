"""Forward and forward+backward of every backend beside eager and compiled python_ref.

Run: pytest bench/ --benchmark-json=bench/results/<name>.json   (writes .md and .png beside)
Smoke (CI): pytest bench/ --benchmark-disable
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint

import python_ref
from ptl_fused import available_backends, ops
from ptl_fused.backends import BACKENDS

from conftest import bench_device, compile_mode, memory_format, run_rounds

DEVICE = bench_device()
# Triton on the CPU is its interpreter (TRITON_INTERPRET=1, set by the tests): a test vehicle,
# not a contender, and far too slow for these shapes.
BACKEND_IMPLS = [
    b
    for b in available_backends()
    if b != "reference"
    and DEVICE.type in BACKENDS[b].device_types
    and not (b == "triton" and DEVICE.type == "cpu")
]
IMPLS = ["eager", "compile", *BACKEND_IMPLS]
# Backward from recomputed gates (fwd+bwd only: a forward without grad keeps nothing either
# way), beside what a PyTorch user would write for that: torch.utils.checkpoint of python_ref.
RECOMPUTE = "+recompute"
RECOMPUTE_IMPLS = ["eager+checkpoint", *(b + RECOMPUTE for b in BACKEND_IMPLS)]
torch._dynamo.config.cache_size_limit = 64

# On a GPU a call of these cells takes 8-64 us of device time against ~25 us of host time, so
# a round of one call and a sync would time the host and the sync: a round is CALLS calls back
# to back, then one sync (report.py divides by calls_per_round), the calls cycling through
# copies of the inputs so that a cell smaller than the L2 cache does not find them there.
CALLS = 20 if DEVICE.type == "cuda" else 1


def input_copies(nbytes: int) -> int:
    """Copies of a row's inputs that together exceed twice the L2 cache (1 on the CPU)."""
    if DEVICE.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    return min(CALLS, max(1, -(-2 * l2 // max(nbytes, 1))))


def make_args(shape, v2: bool, dtype: torch.dtype) -> tuple[list, list[torch.Tensor]]:
    """Op arguments (as a training step sees them) and the leaves that get gradients."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size, scale=1.0, grad=False, dt=dtype):
        t = (torch.randn(*size, generator=g) * scale).to(DEVICE, dt)
        return t.contiguous(memory_format=memory_format()).requires_grad_(grad)

    ho, wo = shape.out_hw
    state = (shape.batch, shape.cout, ho, wo)
    sdt = python_ref.state_dtype(dtype)
    cin_gate = 2 * shape.cin if v2 else shape.cin
    x = rnd(shape.batch, shape.cin, shape.h, shape.w, grad=True)
    w = rnd(4 * shape.cout, cin_gate, shape.k, shape.k, scale=(cin_gate * shape.k**2) ** -0.5, grad=True)
    c = rnd(*state, scale=0.5, dt=sdt)
    if not v2:
        return [x, w, None, c, shape.stride, shape.padding], [x, w]
    wr = rnd(shape.cout, shape.cin, shape.k, shape.k, scale=(shape.cout * shape.k**2) ** -0.5, grad=True)
    h = rnd(*state, scale=0.5, dt=sdt)
    alpha = torch.tensor(0.5, device=DEVICE)
    return [x, w, None, wr, None, c, h, alpha, shape.stride, shape.padding], [x, w, wr]


@functools.cache
def cell_fn(impl: str, v2: bool):
    ref = python_ref.bconv_cell_v2 if v2 else python_ref.bconv_cell
    if impl == "eager":
        return ref
    if impl == "compile":  # static shapes: each table shape gets its own graph, as in training
        return torch.compile(ref, mode=compile_mode(), dynamic=False)
    if impl == "eager+checkpoint":
        return functools.partial(torch.utils.checkpoint.checkpoint, ref, use_reentrant=False)
    op = ops.bconv_cell_v2 if v2 else ops.bconv_cell
    backend = impl.removesuffix(RECOMPUTE)
    return functools.partial(op, backend=backend, recompute=backend != impl)


def saved_bytes(run, weights: tuple[torch.Tensor, ...] = ()) -> tuple[int, int]:
    """Bytes of the unique storages autograd saves for backward during `run()`: all of them, and
    those of `weights` among them (parameters: the model holds them whether saved or not)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        # Not t itself: an output saved by its own grad_fn would then hold that grad_fn in a
        # cycle through C++ that Python's gc cannot free (every eager row leaked its graph).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    weight_ptrs = {w.untyped_storage().data_ptr() for w in weights}
    return sum(storages.values()), sum(n for p, n in storages.items() if p in weight_ptrs)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# Loose enough for bf16 (8 bits of mantissa) summed over a batch, tight enough to catch a wrong
# kernel: a row that times a wrong result must not reach the table.
TOLERANCE = 5e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (at least 1)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1)).item()


def assert_matches_eager(fn, args: list, leaves: list[torch.Tensor], grad_y: torch.Tensor, v2: bool) -> None:
    """The row's outputs, carried states and gradients must be eager python_ref's."""
    ref = python_ref.bconv_cell_v2 if v2 else python_ref.bconv_cell
    got, want = fn(*args), ref(*args)
    got_grads = torch.autograd.grad(got[0], leaves, grad_y)
    want_grads = torch.autograd.grad(want[0], leaves, grad_y)
    grad_names = [f"grad {n}" for n in ("x", "weight", "weight_rec")[: len(leaves)]]
    names = ["y", "c_new", "h_new"][: len(want)] + grad_names
    for name, a, b in zip(names, [*got, *got_grads], [*want, *want_grads], strict=True):
        err = rel_err(a, b)
        assert err < TOLERANCE, f"{name} differs from eager python_ref's (rel. error {err:.2e})"


def copies(args: list, n: int) -> list[list]:
    """`args` and n - 1 device copies of its tensors (leaves stay leaves), for input_copies."""

    def copy(a):
        return a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a

    return [args] + [[copy(a) for a in args] for _ in range(n - 1)]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize(
    "impl,pass_",
    [
        pytest.param(i, p, id=f"{i}-{p}")
        for p, impls in (("fwd", IMPLS), ("fwd+bwd", IMPLS + RECOMPUTE_IMPLS))
        for i in impls
    ],
)
def test_cell(benchmark, shape, impl, v2, pass_, dtype, repeat):
    args, leaves = make_args(shape, v2, dtype)
    positions = [next(i for i, a in enumerate(args) if a is leaf) for leaf in leaves]
    sets = [(a, [a[i] for i in positions]) for a in copies(args, input_copies(shape.bytes(v2, dtype)))]
    fn = cell_fn(impl, v2)
    grad_y = torch.randn_like(fn(*args)[0])

    def forward():
        with torch.no_grad():
            for i in range(CALLS):
                out = fn(*sets[i % len(sets)][0])
        _sync()
        return out

    def forward_backward():
        for i in range(CALLS):
            a, leaves = sets[i % len(sets)]
            grads = torch.autograd.grad(fn(*a)[0], leaves, grad_y)
        _sync()
        return grads

    timed = forward if pass_ == "fwd" else forward_backward
    # Warm-up outside the timing: compile (with and without grad: two graphs), autotune.
    forward_backward()
    timed()
    if repeat == 0:  # once per row, not once per timing block
        assert_matches_eager(fn, args, leaves, grad_y, v2)
    version = "v2" if v2 else "v1"
    saved, saved_weights = saved_bytes(lambda: fn(*args), tuple(leaves[1:]))  # leaves[1:]: the weights
    benchmark.group = f"{shape.name} {version} {pass_}"
    flops = shape.flops(v2) * (3 if pass_ == "fwd+bwd" else 1)  # backward: dx and dW convs
    benchmark.extra_info.update(
        impl=impl,
        shape=shape.name,
        shape_desc=shape.describe(),
        version=version,
        pass_=pass_,
        repeat=repeat,
        dtype=str(dtype).removeprefix("torch."),
        device=DEVICE.type,
        flops=flops,
        bytes=shape.bytes(v2, dtype),
        saved_bytes=saved,
        saved_weight_bytes=saved_weights,
        calls_per_round=CALLS,
        input_copies=len(sets),
    )
    run_rounds(benchmark, timed)


@functools.cache
def eval_fn(impl: str, v2: bool):
    """Eval from the zero state: eager/compile run the full python_ref cell on zero states (what
    a plain PyTorch user runs); a backend runs ops with c_prev=None (the shortcut, its gate
    rows and v2's gate map taken from the parameters on every call), as the modules do."""
    ref = python_ref.bconv_cell_v2 if v2 else python_ref.bconv_cell
    if impl == "eager":
        return ref
    if impl == "compile":
        return torch.compile(ref, mode=compile_mode(), dynamic=False)
    op = ops.bconv_cell_v2 if v2 else ops.bconv_cell
    return lambda *args: op(*args, backend=impl)[0]


# Positions of c_prev (and h_prev) in make_args' argument lists.
STATE_ARGS = {False: (3,), True: (5, 6)}


def eval_args(impl: str, args: list, v2: bool) -> list:
    """The zero state: explicit zeros for the full cell, None (inference) for the ops."""
    zero = (lambda a: torch.zeros_like(a)) if impl in ("eager", "compile") else (lambda a: None)
    return [zero(a) if i in STATE_ARGS[v2] else a for i, a in enumerate(args)]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_cell_eval(benchmark, shape, impl, v2, dtype, repeat):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args(shape, v2, dtype)[0]]
    sets = copies(eval_args(impl, args, v2), input_copies(shape.eval_bytes(dtype)))
    fn = eval_fn(impl, v2)

    def forward():
        with torch.no_grad():
            for i in range(CALLS):
                out = fn(*sets[i % len(sets)])
        _sync()
        return out

    y = forward()  # warm-up (compile, autotune)
    forward()
    # Every row must compute the same y: the zero-state cell with the real weights.
    ref = (python_ref.bconv_cell_v2 if v2 else python_ref.bconv_cell)(*eval_args("eager", args, v2))[0]
    y = y[0] if isinstance(y, tuple) else y
    err = rel_err(y, ref)
    assert err < TOLERANCE, f"{impl} eval output differs from the zero-state reference (rel. error {err:.2e})"
    version = "v2" if v2 else "v1"
    benchmark.group = f"{shape.name} {version} eval"
    benchmark.extra_info.update(
        impl=impl,
        shape=shape.name,
        shape_desc=shape.describe(),
        version=version,
        pass_="eval",
        repeat=repeat,
        dtype=str(dtype).removeprefix("torch."),
        device=DEVICE.type,
        flops=shape.eval_flops(),
        bytes=shape.eval_bytes(dtype),
        saved_bytes=0,
        calls_per_round=CALLS,
        input_copies=len(sets),
    )
    run_rounds(benchmark, forward)
