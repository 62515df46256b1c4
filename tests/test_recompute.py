"""recompute=True: backward computes the gates (and v2's X~) again instead of keeping them.

The same suite as every backend (tests/cells.py: forward, every gradient, the carried state
against the float64 python_ref), plus what recomputing is for: autograd keeps the inputs
alone, and on the CPU the values are bit for bit those of the saving path.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import ptl_fused

from cells import (
    CASES,
    DTYPES,
    WIDE_CASES,
    backend_params,
    call,
    cast_inputs,
    check_cell,
    forward_backward,
    make_inputs,
)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_recomputing_matches_reference(backend, device, case, dtype, v2):
    check_cell(backend, device, case, v2, dtype, make_inputs(case, v2), recompute=True)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", WIDE_CASES[:2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cuda",)))
def test_recomputing_wide_cells_on_gpu(backend, device, case, dtype, v2):
    check_cell(backend, device, case, v2, dtype, make_inputs(case, v2), recompute=True)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cpu",)))
def test_recomputing_gives_the_saving_paths_values_bit_for_bit(backend, device, v2):
    # The recomputed gates come from the same forward on the same inputs. (On a GPU, Triton
    # may autotune the saving and the recomputing kernels to different tiles: tolerance.)
    case = CASES[3]
    master = make_inputs(case, v2)
    saving = forward_backward(backend, cast_inputs(master, torch.float32, device), case, v2)
    recomputing = forward_backward(
        backend, cast_inputs(master, torch.float32, device), case, v2, recompute=True
    )
    for a, b in zip(saving[0], recomputing[0], strict=True):
        assert torch.equal(a, b)
    for name, g in saving[1].items():
        assert torch.equal(g, recomputing[1][name]), f"d{name}"


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_reference_recompute_reads_no_rng_state(monkeypatch, v2):
    # torch.utils.checkpoint saves and restores the RNG states by default; reading the CUDA
    # generator's is an error under CUDA-graph capture, and python_ref draws no random numbers.
    def refuse():
        raise AssertionError("an RNG state was read")

    monkeypatch.setattr(torch, "get_rng_state", refuse)
    monkeypatch.setattr(torch.cuda, "get_rng_state", refuse)
    case = CASES[3]
    master = make_inputs(case, v2)
    saving = forward_backward("reference", cast_inputs(master, torch.float32, "cpu"), case, v2)
    recomputing = forward_backward(
        "reference", cast_inputs(master, torch.float32, "cpu"), case, v2, recompute=True
    )
    for name, g in saving[1].items():
        assert torch.equal(g, recomputing[1][name]), f"d{name}"


def _kept_for_backward(run) -> dict[int, int]:
    """data_ptr -> bytes of every storage autograd saves during run()."""
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        kept[s.data_ptr()] = s.nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return kept


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cpu",)))
def test_a_recomputing_module_keeps_no_gates(backend, device, v2):
    # The modules' recompute flag reaches the op: autograd then keeps at least the fp32 gates
    # (B, 4·Cout, Ho, Wo) less. (The values alone cannot tell: on the CPU they are the same.)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    kept = {}
    for recompute in (False, True):
        cls = ptl_fused.BConvCellV2 if v2 else ptl_fused.BConvCell
        cell = cls(8, 8, padding=1, backend=backend, recompute=recompute)
        kept[recompute] = sum(_kept_for_backward(lambda c=cell: c(x)).values())
    assert kept[False] - kept[True] >= 2 * 4 * 8 * 9 * 7 * 4, kept


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_recomputing_keeps_only_the_inputs(backend, device, v2):
    case = CASES[0]
    args = cast_inputs(make_inputs(case, v2), torch.float32, device)
    inputs = {t.untyped_storage().data_ptr() for t in args.values() if isinstance(t, Tensor)}
    b, cout, (ho, wo) = case.batch, case.cout, case.out_hw
    gate_bytes = b * 4 * cout * ho * wo * 4

    def others(recompute):
        kept = _kept_for_backward(lambda: call(backend, args, case, v2, recompute))
        return {p: n for p, n in kept.items() if p not in inputs}

    # The saving path keeps the gates (and X~ for v2) beside the inputs: the check can fail.
    assert sum(others(False).values()) >= gate_bytes
    # Recomputing: the inputs, and at most v2's h_alpha made a one-element device tensor.
    assert all(n <= 8 for n in others(True).values()), others(True)


class _GatesOfForwardOps(TorchDispatchMode):
    """The gates output of every fused forward op run inside it (below autograd)."""

    def __init__(self):
        super().__init__()
        self.gates: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name.startswith("ptl_fused::") and name.endswith("_fwd"):
            self.gates.append(out[3 if "v2" in name else 2])
        return out


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
def test_a_forward_without_backward_writes_no_gates(backend, device, v2):
    # No backward to come (torch.no_grad, or no input requiring grad, e.g. a frozen cell on
    # detached features): the fused forward op is asked for no gates (save_gates=False; that
    # the kernels then store none: test_cuda_kernels_emulated.py, test_gpu.py). With a
    # backward to come it saves them.
    case = CASES[0]
    master = make_inputs(case, v2)
    b, cout, (ho, wo) = case.batch, case.cout, case.out_hw
    runs = {
        "no_grad": (torch.no_grad(), True),
        "frozen": (contextlib.nullcontext(), False),
        "training": (contextlib.nullcontext(), True),
    }
    for name, (context, requires_grad) in runs.items():
        args = cast_inputs(master, torch.float32, device, requires_grad=requires_grad)
        with context, _GatesOfForwardOps() as seen:
            call(backend, args, case, v2)
        assert len(seen.gates) == 1, name
        want = (b, 4 * cout, ho, wo) if name == "training" else (0,)
        assert tuple(seen.gates[0].shape) == want, name


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", [p for p in backend_params(("cpu",)) if p.values[0] != "triton"])
def test_gradcheck_float64_recomputing(backend, device, v2):
    case = CASES[1]
    args = cast_inputs(make_inputs(case, v2), torch.float64, device)
    names = [n for n, t in args.items() if isinstance(t, Tensor)]

    def fn(*tensors):
        return call(backend, {**args, **dict(zip(names, tensors, strict=True))}, case, v2, recompute=True)

    assert torch.autograd.gradcheck(fn, [args[n] for n in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cpu",)))
def test_recomputing_cells_train_as_the_saving_ones(backend, device, v2):
    # Three steps with the state carried and the batch size changing: the same weights and
    # states, exactly, on the CPU.
    torch.manual_seed(0)
    cls = ptl_fused.BConvCellV2 if v2 else ptl_fused.BConvCell
    saving = cls(3, 4, stride=2, padding=1, bias=True, backend=backend)
    recomputing = copy.deepcopy(saving)
    assert ptl_fused.set_recompute(torch.nn.Sequential(recomputing)) == 1 and recomputing.recompute
    assert "recompute=True" in repr(recomputing) and "recompute" not in repr(saving)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (saving, recomputing)]
    for batch in (2, 3, 2):
        x = torch.randn(batch, 3, 7, 6)
        for m, opt in zip((saving, recomputing), opts, strict=True):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(saving.named_parameters(), recomputing.parameters(), strict=True):
        assert torch.equal(p, q), name
    states = [s if isinstance(s, tuple) else (s,) for s in (saving.state, recomputing.state)]
    for a, b in zip(*states, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_backward_under_autocast_recomputes_the_forwards_dtype(backend, device, v2):
    # A float32 forward, its backward called inside an autocast region: the recompute must run
    # in float32 as the first run did (the C++ ops' Autocast kernels would cast to bfloat16).
    case = CASES[0]
    master = make_inputs(case, v2)
    saving = forward_backward(backend, cast_inputs(master, torch.float32, device), case, v2)
    args = cast_inputs(master, torch.float32, device)
    outs = call(backend, args, case, v2, recompute=True)
    g = torch.Generator().manual_seed(1)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs
    )
    leaves = {n: t for n, t in args.items() if isinstance(t, Tensor)}
    with torch.autocast(device, dtype=torch.bfloat16):
        grads = torch.autograd.grad(loss, list(leaves.values()))
    for name, got in zip(leaves, grads, strict=True):
        torch.testing.assert_close(got, saving[1][name], rtol=1e-5, atol=1e-6, msg=f"d{name}")


def test_recompute_must_be_a_bool():
    with pytest.raises(TypeError, match="recompute must be a bool, got 1"):
        ptl_fused.BConvCell(3, 4, recompute=1)
    with pytest.raises(TypeError, match="recompute must be a bool, got 'yes'"):
        ptl_fused.set_recompute(ptl_fused.BConvCellV2(3, 4), "yes")
    case = CASES[0]
    args = cast_inputs(make_inputs(case, False), torch.float32, "cpu")
    with pytest.raises(TypeError, match="recompute must be a bool, got None"):
        ptl_fused.ops.bconv_cell(*args.values(), case.stride, case.padding, recompute=None)
