"""The inference shortcut (DESIGN.md §5): every backend's eval path against the full
python_ref cell started from the zero state, the module's cache, gradients, compile, export."""

from __future__ import annotations

import pytest
import torch

import ptl_fused
import python_ref
from ptl_fused import ops
from ptl_fused.backends import BACKENDS

from cells import (
    CASES,
    CHANNELS_LAST_CASES,
    DTYPES,
    WIDE_CASES,
    Case,
    backend_params,
    cast_inputs,
    eval_shortcut,
    every_other,
    make_inputs,
    skip_unsupported,
    zero_state_reference,
)
from tolerances import assert_matches_oracle


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_shortcut_is_the_zero_state_cell(case, v2, bias):
    # In float64 the shortcut and the full cell differ only by summation order.
    args = cast_inputs(make_inputs(case, v2, bias), torch.float64, "cpu", requires_grad=False)
    want = zero_state_reference(args, case, v2)
    got = eval_shortcut(args, case, v2, "reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias,bias_rec", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("case", [*CASES, Case(2, 5, 3, 6, 9, 5, 2, 2)], ids=str)
def test_v2_eval_params_are_the_reference_gate_map(case, bias, bias_rec):
    # ops' channel-sum-then-ones-plane form of the map against python_ref's constant X~ conv.
    a = cast_inputs(make_inputs(case, True), torch.float64, "cpu", requires_grad=False)
    b, b_rec = a["bias"] if bias else None, a["bias_rec"] if bias_rec else None
    size, s, p = (case.h, case.w), case.stride, case.padding
    w3, b3, gate_map = ops.v2_eval_params(a["weight"], b, b_rec, size, s, p)
    assert (gate_map is None) == (not bias_rec) and (b3 is None) == (gate_map is not None or not bias)
    got = torch.zeros(3 * case.cout, *case.out_hw, dtype=torch.float64)
    got += 0 if gate_map is None else gate_map
    got += 0 if b3 is None else b3.view(-1, 1, 1)
    want = python_ref.v2_gate_map(a["weight"], b, b_rec, size, s, p)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(w3, python_ref.eval_gate_rows(a["weight"][:, : case.cin]), rtol=0, atol=0)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_eval_shortcut_matches_reference(backend, device, case, dtype, v2):
    skip_unsupported(backend, device, dtype)
    master = make_inputs(case, v2)
    oracle = zero_state_reference(cast_inputs(master, torch.float64, "cpu", False), case, v2)
    eager = zero_state_reference(cast_inputs(master, dtype, device, False), case, v2)
    got = eval_shortcut(cast_inputs(master, dtype, device, False), case, v2, backend)
    assert got.dtype == dtype
    assert_matches_oracle(f"{case} eval y", got, eager, oracle, dtype)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_eval_shortcut_without_bias(backend, device, case, v2):
    # bias=False is the modules' default (v2: no bias_rec either, so no gate map): each kernel's
    # no-bias path (the tests above all pass biases).
    master = make_inputs(case, v2, bias=False)
    assert master["bias"] is None and (not v2 or master["bias_rec"] is None)
    oracle = zero_state_reference(cast_inputs(master, torch.float64, "cpu", False), case, v2)
    eager = zero_state_reference(cast_inputs(master, torch.float32, device, False), case, v2)
    got = eval_shortcut(cast_inputs(master, torch.float32, device, False), case, v2, backend)
    assert_matches_oracle(f"{case} eval y (no bias)", got, eager, oracle, torch.float32)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cuda",)))
def test_eval_shortcut_wide_cells_on_gpu(backend, device, case, dtype, v2):
    test_eval_shortcut_matches_reference(backend, device, case, dtype, v2)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cuda",)))
def test_eval_shortcut_wide_cells_channels_last_on_gpu(backend, device, v2):
    test_eval_shortcut_channels_last(backend, device, v2, case=WIDE_CASES[0])


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_eval_shortcut_channels_last(backend, device, v2, case=CASES[1]):
    master = make_inputs(case, v2)
    oracle = zero_state_reference(cast_inputs(master, torch.float64, "cpu", False), case, v2)
    args = cast_inputs(master, torch.float32, device, False)
    args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
    got = eval_shortcut(args, case, v2, backend)
    eager = zero_state_reference(cast_inputs(master, torch.float32, device, False), case, v2)
    assert_matches_oracle(f"{case} eval y (channels_last)", got, eager, oracle, torch.float32)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_eval_shortcut_channels_last_whole_channel_groups(backend, device, case, v2):
    test_eval_shortcut_channels_last(backend, device, v2, case=case)


@pytest.mark.parametrize("with_map", [False, True], ids=["bias3", "v2-gate_map"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_prepared_eval_op_takes_strided_parameters(backend, device, with_map):
    # Every-other-element views of weight3, bias3 and the gate map: Triton read the bias as
    # dense (max error 0.73), as cuda_igemm's raw pointer did (1.17, emulated).
    case = CASES[1]
    a = cast_inputs(make_inputs(case, with_map), torch.float32, device, False)
    if with_map:  # v2 with bias_rec: the biases fold into the map, bias3 is None
        size = a["x"].shape[-2:]
        weight3, bias3, gate_map = ops.v2_eval_params(
            a["weight"], a["bias"], a["bias_rec"], size, case.stride, case.padding
        )
        assert bias3 is None and gate_map is not None
    else:
        rows = python_ref.eval_gate_rows
        weight3, bias3, gate_map = rows(a["weight"]), rows(a["bias"]), None
    want = python_ref.bconv_cell_eval(a["x"], weight3, bias3, gate_map, case.stride, case.padding)

    def strided(t):
        return None if t is None else every_other(t)

    got = ops.bconv_cell_eval(
        a["x"], strided(weight3), strided(bias3), strided(gate_map), case.stride, case.padding, backend
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prepared_eval_op_refuses_a_non_square_kernel_or_mixed_dtypes():
    # The backends read k from different dimensions (three output shapes; the CPU epilogue read
    # past the gates) and Triton failed on mixed dtypes deep in its interpreter.
    x = torch.randn(2, 3, 7, 7)
    with pytest.raises(ValueError, match=r"weight3 must be \(3\*Cout, 3, k, k\) with square k"):
        ops.bconv_cell_eval(x, torch.randn(12, 3, 3, 1), None, None)
    with pytest.raises(RuntimeError, match="eval weight must be .* with square k"):
        torch.ops.ptl_fused.bconv_cell_eval(x, torch.randn(12, 3, 1, 3), None, None, 1, 0, False)
    with pytest.raises(RuntimeError, match=r"eval bias must be \(3\*Cout,\)"):
        torch.ops.ptl_fused.bconv_cell_eval(x, torch.randn(12, 3, 3, 3), torch.randn(16), None, 1, 0, False)
    with pytest.raises(TypeError, match="weight3 is torch.float64 but x is torch.float32"):
        ops.bconv_cell_eval(x, torch.randn(12, 3, 3, 3, dtype=torch.float64), None, None)
    with pytest.raises(TypeError, match="bias3 is torch.float64 but weight is torch.float32"):
        ops.bconv_cell_eval(x, torch.randn(12, 3, 3, 3), torch.randn(12, dtype=torch.float64), None)
    with pytest.raises(
        ValueError, match="x's spatial size 2x2 is too small for kernel_size=3 with padding=0"
    ):
        ops.bconv_cell_eval(torch.randn(2, 3, 2, 2), torch.randn(12, 3, 3, 3), None, None)


def _cell(v2: bool, backend: str, **kw):
    cls = ptl_fused.BConvCellV2 if v2 else ptl_fused.BConvCell
    torch.manual_seed(0)
    return cls(3, 4, kernel_size=3, stride=2, padding=1, bias=True, backend=backend, **kw)


def _module_reference(cell, x):
    """The module's eval output computed by the full python_ref cell from zero states."""
    with torch.no_grad():
        c0 = torch.zeros(cell.state_shape(x), dtype=torch.float32)
        if isinstance(cell, ptl_fused.BConvCellV2):
            ps = (cell.weight, cell.bias, cell.weight_rec, cell.bias_rec)
            return python_ref.bconv_cell_v2(x, *ps, c0, c0, 1.0, cell.stride, cell.padding)[0]
        return python_ref.bconv_cell(x, cell.weight, cell.bias, c0, cell.stride, cell.padding)[0]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eval_sees_every_weight_update(backend, v2):
    # Between two eval calls the weights change in every way a user changes them, including
    # those that leave the version counter alone (`p.data` writes, as EMA teachers do, and
    # fused optimizers): each eval output must be the current weights'.
    cell = _cell(v2, backend).eval()
    x = torch.randn(2, 3, 9, 7)
    outputs = []

    def check():
        with torch.no_grad():
            y = cell(x)
        torch.testing.assert_close(y, _module_reference(cell, x))
        assert not outputs or not torch.allclose(y, outputs[-1]), "eval returned the previous output"
        outputs.append(y)

    check()
    opt = torch.optim.SGD(cell.parameters(), lr=0.5)
    cell.train()
    cell(x).square().sum().backward()
    opt.step()
    cell.eval()
    check()
    with torch.no_grad():  # in place in eval mode, no train() in between
        if v2 and cell.bias_rec is not None:
            cell.bias_rec.add_(0.3)  # v2's gate map depends on the recovery bias
        cell.weight.mul_(1.5)
    check()
    for p in cell.parameters():  # an EMA teacher's update: the version counter does not move
        p.data.mul_(0.9).add_(0.05)
    check()
    fused = torch.optim.Adam(cell.parameters(), lr=0.1, fused=True)
    for p in cell.parameters():
        p.grad = torch.randn_like(p)
    fused.step()
    check()
    cell.load_state_dict(_cell(v2, backend).state_dict())  # copies in place
    check()
    x2 = torch.randn(1, 3, 6, 11)  # another input size: another v2 gate map
    with torch.no_grad():
        torch.testing.assert_close(cell(x2), _module_reference(cell, x2))


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_eval_with_gradients_uses_the_full_cell(backend, v2, frozen):
    # With grad mode on, eval must still give exact gradients: to trainable parameters, and to
    # x alone with frozen ones (saliency maps, adversarial inputs: no test had that case).
    if backend not in ptl_fused.available_backends() or "cpu" not in BACKENDS[backend].device_types:
        pytest.skip(f"{backend} does not run CPU tensors here")
    cell = _cell(v2, backend).eval().requires_grad_(not frozen)
    ref = _cell(v2, "reference").eval().requires_grad_(not frozen)
    x = torch.randn(2, 3, 9, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    cell(x).sin().sum().backward()
    c0 = torch.zeros(ref.state_shape(x_ref))
    if v2:
        ps = (ref.weight, ref.bias, ref.weight_rec, ref.bias_rec)
        y = python_ref.bconv_cell_v2(x_ref, *ps, c0, c0, 1.0, 2, 1)[0]
    else:
        y = python_ref.bconv_cell(x_ref, ref.weight, ref.bias, c0, 2, 1)[0]
    y.sin().sum().backward()
    assert x.grad is not None, "no gradient for x"
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(cell.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad is None) == frozen, f"gradient of {name}"
        if not frozen:
            torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    assert cell.state is None, "eval must not carry a state"


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_eval_shortcut_under_torch_compile(v2):
    cell = _cell(v2, "cpu").eval()
    x = torch.randn(2, 3, 9, 7)
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _module_reference(cell, x))
        with torch.no_grad():
            cell.weight.mul_(0.5)  # compiled code reads the parameters each call: no stale cache
        torch.testing.assert_close(compiled(x), _module_reference(cell, x))


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torch_export_decomposes_with_the_shortcut(v2, grad_mode):
    # Also with grad mode on and trainable parameters (before: the full 4-gate cell from zeros,
    # v2 with a conv_transpose2d of the zero H).
    cell = _cell(v2, "cpu").eval()
    x = torch.randn(2, 3, 9, 7)
    with torch.set_grad_enabled(grad_mode):
        ep = torch.export.export(cell, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("ptl_fused" in t for t in targets), f"custom ops left in the exported graph: {targets}"
    convs = [n for n in ep.graph.nodes if "conv" in str(n.target)]
    gate_weight = [n for n in convs if n.meta["val"].shape[1] == 3 * cell.out_channels]
    assert gate_weight, "the gate conv must have 3*Cout outputs (no forget gate)"
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), _module_reference(cell, x))


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck_eval_op(backend, device):
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not a custom op")
    op = (
        torch.ops.ptl_fused.triton_bconv_cell_eval
        if backend == "triton"
        else torch.ops.ptl_fused.bconv_cell_eval
    )
    x = torch.randn(2, 3, 7, 5, device=device)
    w3, b3 = torch.randn(12, 3, 3, 3, device=device), torch.randn(12, device=device)
    gate_map = torch.randn(12, 4, 3, device=device)
    extra = (True,) if backend == "cuda_igemm" else ()  # fused_gemm
    torch.library.opcheck(op, (x, w3, b3, None, 2, 1, *extra))
    torch.library.opcheck(op, (x, w3, None, gate_map, 2, 1, *extra))


def test_eval_errors():
    x = torch.randn(2, 3, 7, 5)
    w = torch.randn(16, 6, 3, 3)
    wr = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="both be tensors, or both None"):
        ops.bconv_cell_v2(x, w, None, wr, None, None, torch.zeros(2, 4, 7, 5), 1.0, 1, 1)
    with pytest.raises(ValueError, match=r"weight3 must be \(3\*Cout, 3, k, k\)"):
        ops.bconv_cell_eval(x, torch.randn(16, 3, 3, 3), None, None, 1, 1)
    with pytest.raises(ValueError, match=r"gate_map must have shape \(3\*Cout, Ho, Wo\) = \(12, 7, 5\)"):
        ops.bconv_cell_eval(x, torch.randn(12, 3, 3, 3), None, torch.zeros(12, 5, 5), 1, 1)
    with pytest.raises(RuntimeError, match="no backward"):
        ops.bconv_cell_eval(x, torch.randn(12, 3, 3, 3, requires_grad=True), None, None, 1, 1)


def test_ptlnet_exports_with_the_shortcut():
    # A whole PTL network with fused cells exports as plain ATen ops, and gives the same features.
    import warnings

    from ptl_fused.models import PTLNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init warning
        torch.manual_seed(0)
        net = PTLNet("resnet18", 5, cell="v2", backend="cpu", input_size=(64, 32), feat_dim=32).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        ep = torch.export.export(net, (x,))
        want = net(x).feature
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("ptl_fused" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x).feature, want, rtol=1e-4, atol=1e-5)
