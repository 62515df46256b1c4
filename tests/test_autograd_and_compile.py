"""gradcheck in float64, torch.library.opcheck, torch.compile(fullgraph=True), autocast."""

from __future__ import annotations

import math

import pytest
import torch

import ptl_fused

from cells import CASES, backend_params, call, cast_inputs, forward_backward, make_inputs, skip_unsupported
from tolerances import assert_matches_oracle


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_gradcheck_float64(backend, device, case, v2):
    if backend == "triton" and device == "cpu":
        pytest.skip("gradcheck's thousands of calls are too slow in Triton's interpreter (run on the GPU)")
    args = cast_inputs(make_inputs(case, v2), torch.float64, device)
    names = [n for n, t in args.items() if isinstance(t, torch.Tensor)]

    def fn(*tensors):
        return call(backend, {**args, **dict(zip(names, tensors, strict=True))}, case, v2)

    # On a GPU, cuDNN's backward may accumulate with atomics (a different last bit per call):
    # gradcheck's reentrancy check then needs a non-zero tolerance.
    nondet_tol = 1e-12 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(fn, [args[n] for n in names], eps=1e-6, atol=1e-7, nondet_tol=nondet_tol)


def _op_samples(v2: bool, dtype=torch.float32, device="cpu", fused_gemm=None, save_gates=True):
    case = CASES[1]
    args = cast_inputs(make_inputs(case, v2), dtype, device)
    extra = () if fused_gemm is None and save_gates else (bool(fused_gemm), save_gates)
    if v2:
        args["h_alpha"] = torch.tensor(0.25, device=device)
        return torch.ops.ptl_fused.bconv_cell_v2_fwd.default, (
            *args.values(),
            case.stride,
            case.padding,
            *extra,
        )
    return torch.ops.ptl_fused.bconv_cell_fwd.default, (*args.values(), case.stride, case.padding, *extra)


_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("save_gates", [True, False], ids=["saving", "recomputing"])
@pytest.mark.parametrize(
    "device,fused_gemm",
    [("cpu", None), pytest.param("cuda", False, marks=_NO_GPU), pytest.param("cuda", True, marks=_NO_GPU)],
    ids=["cpu", "cuda", "cuda-fused_gemm"],
)
def test_opcheck_forward_ops(v2, channels_last, save_gates, device, fused_gemm):
    # save_gates=False with inputs that need a gradient: backward runs the forward again.
    op, args = _op_samples(v2, device=device, fused_gemm=fused_gemm, save_gates=save_gates)
    if channels_last:
        args = tuple(
            a.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            if isinstance(a, torch.Tensor) and a.dim() == 4
            else a
            for a in args
        )
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_opcheck_backward_ops(v2):
    fwd, args = _op_samples(v2)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        outs = fwd(*args)
    n_states = 2 if v2 else 1
    grads = [torch.randn_like(o) for o in outs[: 1 + n_states]]
    c_prev = args[5] if v2 else args[3]
    gates = outs[1 + n_states]
    if v2:
        torch.library.opcheck(torch.ops.ptl_fused.bconv_cell_v2_bwd.default, (*grads, c_prev, gates, args[7]))
        torch.library.opcheck(
            torch.ops.ptl_fused.bconv_cell_v2_bwd.default, (None, None, grads[2], c_prev, gates, args[7])
        )
    else:
        torch.library.opcheck(torch.ops.ptl_fused.bconv_cell_bwd.default, (*grads, c_prev, gates))
        torch.library.opcheck(torch.ops.ptl_fused.bconv_cell_bwd.default, (grads[0], None, c_prev, gates))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("save_gates", [True, False], ids=["saving", "recomputing"])
@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] == "triton"])
def test_opcheck_triton_ops(backend, device, v2, save_gates):
    # The Triton backend's own custom ops (schema, fake kernel, autograd registration, the
    # dispatch checks of torch.compile), as the C++ ops' above; on the CPU in the interpreter.
    _, args = _op_samples(v2, device=device)
    forward = (
        torch.ops.ptl_fused.triton_bconv_cell_v2_fwd if v2 else torch.ops.ptl_fused.triton_bconv_cell_fwd
    )
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if not save_gates:  # the no-grad forward, and the recomputing one (backward runs it again)
        torch.library.opcheck(forward, (*detached, False))
        torch.library.opcheck(forward, (*args, False))
        return
    torch.library.opcheck(forward, (*args, True))
    with torch.no_grad():
        outs = forward(*detached, True)
    n_states = 2 if v2 else 1
    grads = [torch.randn_like(o) for o in outs[: 1 + n_states]]
    c_prev, gates = detached[5 if v2 else 3], outs[1 + n_states]
    h_alpha = detached[7] if v2 else None
    grad_h = grads[2] if v2 else None
    backward = torch.ops.ptl_fused.triton_bconv_cell_bwd
    torch.library.opcheck(backward, (grads[0], grads[1], grad_h, c_prev, gates, h_alpha))
    torch.library.opcheck(backward, (grads[0], None, None, c_prev, gates, h_alpha))  # y's grad alone


@pytest.mark.parametrize("recompute", [False, True], ids=["saving", "recomputing"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_compile_fullgraph_forward_backward(backend, device, v2, recompute):
    # Recomputing under compile: the fused ops' backward runs the forward op again inside the
    # compiled backward graph; the reference's torch.utils.checkpoint is traced as such.
    torch._dynamo.reset()
    case = CASES[1]
    master = make_inputs(case, v2)
    if v2:
        master["h_alpha"] = torch.tensor(0.25, dtype=torch.float64)
    op = ptl_fused.ops.bconv_cell_v2 if v2 else ptl_fused.ops.bconv_cell
    compiled = torch.compile(
        lambda *a: op(*a, case.stride, case.padding, backend=backend, recompute=recompute),
        fullgraph=True,
        dynamic=False,
    )
    args = cast_inputs(master, torch.float32, device)
    if v2:
        args["h_alpha"] = args["h_alpha"].detach().float()
    outs = compiled(*args.values())
    sum(o.sum() for o in outs).backward()
    ref_args = cast_inputs(master, torch.float32, device)
    if v2:
        ref_args["h_alpha"] = ref_args["h_alpha"].detach().float()
    ref_outs = op(*ref_args.values(), case.stride, case.padding, backend=backend)
    sum(o.sum() for o in ref_outs).backward()
    for got, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(got, want)
    for name, t in args.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            torch.testing.assert_close(t.grad, ref_args[name].grad, msg=f"d{name}")


def _saved_by_compiled_graph(fn, args: tuple) -> list[tuple[int, ...]]:
    """Shapes of the tensors the compiled forward graph hands its backward, other than the
    graph's inputs, under the partitioner torch.compile's default (inductor) uses."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved: list[tuple[int, ...]] = []

    def forward_graph(gm, example_inputs):
        (outputs,) = (n.args[0] for n in gm.graph.nodes if n.op == "output")
        for node in outputs[n_user_outputs:]:
            if node.op != "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
                saved.append(tuple(node.meta["val"].shape))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    n_user_outputs = len(fn(*args))
    backend = aot_autograd(
        fw_compiler=forward_graph,
        bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    torch._dynamo.reset()
    return saved


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_compiled_recompute_saves_only_the_inputs(backend, device, v2):
    # What eager autograd keeps is checked in test_recompute.py; a compiled graph's saved set
    # is the partitioner's choice, so check it there too: beside the graph's inputs, at most
    # a scalar (v2's h_alpha as a device tensor), where the saving graph keeps the gates.
    case = CASES[1]
    args = tuple(cast_inputs(make_inputs(case, v2), torch.float32, device).values())
    op = ptl_fused.ops.bconv_cell_v2 if v2 else ptl_fused.ops.bconv_cell

    def saved(recompute: bool) -> list[int]:
        def cell(*a):
            return op(*a, case.stride, case.padding, backend=backend, recompute=recompute)

        return [math.prod(shape) for shape in _saved_by_compiled_graph(cell, args)]

    gates = case.batch * 4 * case.cout * math.prod(case.out_hw)
    assert sum(saved(False)) >= gates  # the check can fail: the saving graph keeps the gates
    assert all(n <= 1 for n in saved(True)), saved(True)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
def test_compiled_forward_without_backward_asks_for_no_gates(backend, device, v2):
    # The wrappers decide save_gates from grad mode and requires_grad at trace time (guarded
    # by dynamo): the graph's forward op must carry the value of each run.
    case = CASES[1]
    master = make_inputs(case, v2)
    op = ptl_fused.ops.bconv_cell_v2 if v2 else ptl_fused.ops.bconv_cell
    runs = {"no_grad": (torch.no_grad, True, False), "frozen": (torch.enable_grad, False, False)}
    runs["training"] = (torch.enable_grad, True, True)
    for name, (mode, requires_grad, want) in runs.items():
        graphs = []

        def record(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        args = cast_inputs(master, torch.float32, device, requires_grad=requires_grad)
        with mode():
            torch.compile(
                lambda *a: op(*a, case.stride, case.padding, backend=backend), backend=record, fullgraph=True
            )(*args.values())
        calls = [
            n for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("ptl_fused.") and "_fwd" in str(n.target)
        ]  # fmt: skip
        assert len(calls) == 1, (name, [str(n.target) for n in calls])
        assert calls[0].args[-1] is want, (name, calls[0].args)
    torch._dynamo.reset()


def test_exporting_is_true_under_torch_export_only():
    # The cells take the reference's plain ops while exporting, so exporting() must be False in
    # eager and in a torch.compile'd function; torch 2.11's tracer answers
    # torch.compiler.is_exporting() True in both compile and export.
    class Probe(torch.nn.Module):
        def forward(self, x):  # what exporting() answered at trace time, baked into the graph
            return x + (1.0 if ptl_fused.ops.exporting() else 0.0)

    x = torch.zeros(2)
    runs = {
        "eager": (lambda: Probe()(x), False),
        "compile": (lambda: torch.compile(Probe(), backend="eager", fullgraph=True)(x), False),
        "export strict": (lambda: torch.export.export(Probe(), (x,), strict=True).module()(x), True),
        "export non-strict": (lambda: torch.export.export(Probe(), (x,), strict=False).module()(x), True),
    }
    for name, (run, want) in runs.items():
        torch._dynamo.reset()
        assert run().tolist() == [float(want)] * 2, name
    torch._dynamo.reset()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_autocast_low_precision_compute_float32_state(backend, device, v2, low):
    skip_unsupported(backend, device, low)
    case = CASES[0]
    master = make_inputs(case, v2)
    oracle_out, oracle_grad = forward_backward("oracle", cast_inputs(master, torch.float64, "cpu"), case, v2)
    results = {}
    for who in ("oracle", backend):
        args = cast_inputs(master, torch.float32, device)
        with torch.autocast(device, dtype=low):
            outs, grads = forward_backward(who, args, case, v2)
        results[who] = outs, grads
    outs, grads = results[backend]
    assert outs[0].dtype == low, "y must have the autocast dtype"
    assert all(o.dtype == torch.float32 for o in outs[1:]), "states must stay float32"
    assert all(g.dtype == torch.float32 for g in grads.values() if g is not None), "grads of fp32 leaves"
    eager_outs, eager_grads = results["oracle"]
    for i, (got, eager, oracle) in enumerate(zip(outs, eager_outs, oracle_out, strict=True)):
        assert_matches_oracle(f"autocast out{i}", got, eager, oracle, low)
    for name in oracle_grad:  # fp16 at its own tolerance (it had bf16's, 10x looser)
        assert_matches_oracle(f"autocast d{name}", grads[name], eager_grads[name], oracle_grad[name], low)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cpu",)))
def test_forward_mode_ad_and_torch_func_match_reference(backend, device, v2):
    # The fused ops have no jvp and no functorch rules, so under forward AD and torch.func's
    # grad transforms the op runs python_ref (before: zero tangents, silently).
    import torch.autograd.forward_ad as fwAD

    case = CASES[1]
    args = cast_inputs(make_inputs(case, v2), torch.float64, device, requires_grad=False)
    names = [n for n, t in args.items() if isinstance(t, torch.Tensor)]
    primals = tuple(args[n] for n in names)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def cell(impl):
        return lambda *ts: call(impl, {**args, **dict(zip(names, ts, strict=True))}, case, v2)

    got, want = cell(backend), cell("oracle")
    want_tangents = torch.func.jvp(want, primals, tangents)[1]
    for out, ref in zip(torch.func.jvp(got, primals, tangents)[1], want_tangents, strict=True):
        torch.testing.assert_close(out, ref)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        outs = [fwAD.unpack_dual(o).tangent for o in got(*duals)]
    for out, ref in zip(outs, want_tangents, strict=True):
        torch.testing.assert_close(out, ref)
    argnums = tuple(range(len(primals)))

    def loss(f):
        return lambda *ts: sum((o * o).sum() for o in f(*ts))

    for g, g_ref in zip(
        torch.func.grad(loss(got), argnums)(*primals),
        torch.func.grad(loss(want), argnums)(*primals),
        strict=True,
    ):
        torch.testing.assert_close(g, g_ref)
