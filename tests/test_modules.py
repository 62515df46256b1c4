"""BConvCell / BConvCellV2 modules: the state rules of DESIGN.md §1 against python_ref."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import python_ref
from ptl_fused import BConvCell, BConvCellV2, reset_states

from cells import backend_params


def _make(v2, backend, device="cpu", **kw):
    torch.manual_seed(0)
    kw.setdefault("padding", 1)
    cls = BConvCellV2 if v2 else BConvCell
    return cls(3, 4, kernel_size=3, stride=2, bias=True, backend=backend, **kw).double().to(device)


def _ref_step(cell, x, state, n):
    """One training batch through python_ref with the carried (detached) state."""
    b = x.shape[0]
    shape = (b, cell.out_channels, *[(s + 2 - 3) // 2 + 1 for s in x.shape[-2:]])
    if isinstance(cell, BConvCellV2):
        c_prev = python_ref.carry_state(state and state[0], shape, torch.float64, x.device)
        h_prev = python_ref.carry_state(state and state[1], shape, torch.float64, x.device)
        alpha = 1.0 / n if cell.hidden_momentum is None else cell.hidden_momentum
        y, c, h = python_ref.bconv_cell_v2(
            x, cell.weight, cell.bias, cell.weight_rec, cell.bias_rec, c_prev, h_prev, alpha, 2, 1
        )
        return y, (c.detach(), h.detach())
    c_prev = python_ref.carry_state(state, shape, torch.float64, x.device)
    y, c = python_ref.bconv_cell(x, cell.weight, cell.bias, c_prev, 2, 1)
    return y, c.detach()


def _states(s):
    return (s,) if isinstance(s, torch.Tensor) else tuple(s)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_batch_changes_follow_the_row_rule_by_hand(backend, device, v2):
    # Known answers for the state rule (the test above builds its expected states with
    # python_ref.carry_state, the function the cells call): with i = f = o = 1 and g = tanh(x)
    # (a 1x1 cell on one channel), C_b = C_{b-1} + tanh(x_b) row by row, so each row shows
    # which earlier rows it met. Sample n meets row n; a smaller batch keeps rows [:B]; a
    # larger one starts its extra rows from zeros.
    cell = (BConvCellV2 if v2 else BConvCell)(1, 1, kernel_size=1, bias=True, backend=backend)
    with torch.no_grad():
        cell.weight.zero_()
        cell.weight[3, 0] = 1.0  # the cell gate reads x; v2's recovered input gets weight 0
        cell.bias.copy_(torch.tensor([30.0, 30.0, 30.0, 0.0]))  # i, f, o saturated at 1
    cell.to(device=device, dtype=torch.float64)
    batches = [torch.tensor(v, dtype=torch.float64, device=device).view(-1, 1, 1, 1) for v in
               ([0.1, 0.2, 0.3], [0.4, 0.5], [0.6, 0.7, 0.8, 0.9])]  # fmt: skip
    t = [torch.tanh(b.flatten()).tolist() for b in batches]
    want_c = [
        t[0],
        [t[0][0] + t[1][0], t[0][1] + t[1][1]],  # rows [:2] of batch 1's state
        [t[0][0] + t[1][0] + t[2][0], t[0][1] + t[1][1] + t[2][1], t[2][2], t[2][3]],  # + two fresh rows
    ]
    h = None
    for n, (x, c) in enumerate(zip(batches, want_c, strict=True), start=1):
        y = cell(x)
        state = cell.state[0] if v2 else cell.state
        torch.testing.assert_close(state.flatten().tolist(), c, rtol=0, atol=1e-12, msg=f"C after batch {n}")
        torch.testing.assert_close(
            y.flatten().tolist(),
            torch.tanh(torch.tensor(c, dtype=torch.float64)).tolist(),
            rtol=0,
            atol=1e-12,
        )
        if v2:  # H: the running mean of the outputs, row by row, under the same rule
            rows = y.flatten().tolist()
            prev = ([] if h is None else h[: len(rows)]) + [0.0] * max(
                0, len(rows) - (0 if h is None else len(h))
            )
            h = [p + (r - p) / n for p, r in zip(prev, rows, strict=True)]
            torch.testing.assert_close(cell.state[1].flatten().tolist(), h, rtol=0, atol=1e-12, msg=f"H {n}")


@pytest.mark.parametrize("momentum", [None, 0.3], ids=["running_mean", "ema"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_three_training_batches_with_batch_changes(backend, device, v2, momentum):
    if momentum is not None and not v2:
        pytest.skip("hidden_momentum is a v2 option")
    kw = {"hidden_momentum": momentum} if v2 else {}
    cell = _make(v2, backend, device, **kw)
    ref = copy.deepcopy(cell)
    ref_state = None
    # Batch sizes 3 -> 2 (shrink: rows [:2]) -> 4 (grow: rows 2, 3 start fresh).
    for n, b in enumerate([3, 2, 4], start=1):
        x = torch.randn(b, 3, 9, 7, dtype=torch.float64, device=device)
        y = cell(x)
        y_ref, ref_state = _ref_step(ref, x, ref_state, n)
        # float64 throughout, so tighter than assert_close's 1e-7: a float32 h_alpha (0.3 as
        # 0.3 + 1.2e-8) puts a 3e-9 error into H.
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        for s, s_ref in zip(_states(cell.state), _states(ref_state), strict=True):
            assert not s.requires_grad, "the carried state must be detached"
            torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
        gy = torch.randn_like(y)
        (y * gy).sum().backward()
        (y_ref * gy).sum().backward()
    for (name, p), p_ref in zip(cell.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=f"accumulated grad of {name}")


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_eval_starts_fresh_and_carries_nothing(backend, device, v2):
    cell = _make(v2, backend, device)
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64, device=device)
    cell(torch.randn(4, 3, 9, 7, dtype=torch.float64, device=device))  # a training batch leaves a state
    trained_state = [s.clone() for s in _states(cell.state)]
    cell.eval()
    y_all = cell(x)
    y_rev = cell(x.flip(0)).flip(0)  # batch order does not matter
    y_one = torch.cat([cell(x[i : i + 1]) for i in range(4)])  # nor batch size
    torch.testing.assert_close(y_all, y_rev)
    torch.testing.assert_close(y_all, y_one)
    for s, t in zip(_states(cell.state), trained_state, strict=True):
        torch.testing.assert_close(s, t)  # eval did not touch the training state
    fresh = _make(v2, backend, device).train()
    fresh.load_state_dict(cell.state_dict())
    torch.testing.assert_close(y_all, fresh(x))  # = a first training batch from zeros


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_reset_states_and_state_dict(v2):
    model = nn.Sequential(_make(v2, "auto"), nn.ReLU(), _make(v2, "auto"))
    model[2] = type(model[2])(4, 2, padding=1, backend="auto").double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    y1 = model(x)
    assert model[0].state is not None and model[2].state is not None
    assert not any("state" in k for k in model.state_dict()), "the state must not be in state_dict"
    assert reset_states(model) == 2
    assert model[0].state is None and model[2].state is None
    torch.testing.assert_close(model(x), y1)  # same as a first batch again
    if v2:
        assert model[0].num_batches.item() == 1


def test_state_init_normal():
    torch.manual_seed(0)
    cell = BConvCell(3, 4, padding=1, state_init="normal")
    x = torch.zeros(2, 3, 5, 5)
    y_normal = cell(x)
    cell_zero = BConvCell(3, 4, padding=1)
    cell_zero.load_state_dict(cell.state_dict())
    y_zero = cell_zero(x)
    diff = (y_normal - y_zero).abs().max().item()
    assert 0 < diff < 0.01, "N(0, 0.001²) initial state: small but present"


def test_state_mismatch_is_a_clear_error():
    cell = BConvCell(3, 4, padding=1)
    cell(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"carried state has shape \(2, 4, 8, 8\).*\(2, 4, 6, 6\)"):
        cell(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 3, H, W\)"):
        cell(torch.randn(2, 5, 8, 8))
    cell.reset_state()
    assert cell(torch.randn(2, 3, 6, 6)).shape == (2, 4, 6, 6)
    for mode in (cell.train, cell.eval):  # was AttributeError: 'numpy.ndarray' ... 'dim'
        mode()
        with pytest.raises(TypeError, match="BConvCell expects x as a torch.Tensor, got ndarray"):
            cell(torch.randn(2, 3, 6, 6).numpy())


def test_state_is_float32_under_bf16_and_to_keeps_it():
    cell = BConvCell(3, 4, padding=1).to(torch.bfloat16)
    y = cell(torch.randn(2, 3, 5, 5, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and cell.state.dtype == torch.float32
    cell.to(torch.float16)  # .to() moves the state, never lowers its precision
    assert cell.state.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cell32 = BConvCellV2(3, 4, padding=1)
        y = cell32(torch.randn(2, 3, 5, 5))
    assert y.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in cell32.state)


def test_constructor_errors():
    with pytest.raises(ValueError, match="state_init"):
        BConvCell(3, 4, state_init="uniform")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        BConvCell(3, 4, backend="fast")
    with pytest.raises(ValueError, match="out_channels must be an int >= 1"):
        BConvCell(3, 0)
    for bad in (1.5, True, "0.5"):
        with pytest.raises(ValueError, match="hidden_momentum must be None or a number in"):
            BConvCellV2(3, 4, hidden_momentum=bad)
    with pytest.raises(ValueError, match=r"kernel_size must be an int >= 1, got 3.0"):
        BConvCell(3, 4, kernel_size=3.0)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_exporting_a_training_cell_is_a_clear_error(v2, strict):
    # The program would hold the carried state as a constant and compute one training step from
    # it, at the export's batch size: not the cell. Eval mode exports (tests/test_eval_path.py).
    cell = (BConvCellV2 if v2 else BConvCell)(3, 4, padding=1)
    cell(torch.randn(2, 3, 5, 5))
    with pytest.raises(Exception, match="torch.export / torch.onnx.export of a training-mode cell"):
        torch.export.export(cell, (torch.randn(2, 3, 5, 5),), strict=strict)
    assert cell.training and cell.state is not None
    torch.export.export(cell.eval(), (torch.randn(2, 3, 5, 5),), strict=strict)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_cells_run_on_meta_tensors_for_shapes(v2, backend):
    # Shape inference without memory, as nn.Conv2d allows (a model built on meta, FLOP counters):
    # the reference runs there whatever the backend; training, eval and backward give the CPU's
    # shapes, and to_empty() drops the meta state it left (and v2's batch count).
    cls = BConvCellV2 if v2 else BConvCell
    make = lambda: cls(3, 4, kernel_size=3, stride=2, padding=1, backend=backend)  # noqa: E731
    cpu = make()
    with torch.device("meta"):
        meta = make()
        x = torch.randn(2, 3, 9, 7, requires_grad=True)
    for mode in (True, True, False):
        cpu.train(mode), meta.train(mode)
        y = meta(x)
        want = cpu(torch.randn(2, 3, 9, 7))
        assert y.device.type == "meta" and y.shape == want.shape
    meta.train()(x).sum().backward()
    assert x.grad.shape == x.shape and meta.weight.grad.shape == meta.weight.shape
    assert meta.state is not None
    meta.to_empty(device="cpu")
    assert meta.state is None and (not v2 or int(meta.num_batches) == 0)
    meta.load_state_dict(cpu.state_dict())
    cpu.reset_state()
    x = torch.randn(2, 3, 9, 7)
    torch.testing.assert_close(meta(x), cpu(x))


def test_constructor_takes_numpy_and_other_numbers_as_python_ones():
    import fractions

    import numpy as np

    cell = BConvCellV2(
        np.int64(3), np.int32(4), np.int64(3), padding=np.int8(1), hidden_momentum=fractions.Fraction(1, 2)
    )
    assert [type(v) for v in (cell.in_channels, cell.out_channels, cell.kernel_size, cell.padding)] == [
        int
    ] * 4
    assert cell.hidden_momentum == 0.5 and type(cell.hidden_momentum) is float
    assert cell(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("carrying", [False, True], ids=["fresh", "carrying"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_smaller_than_the_kernel_is_a_clear_error(v2, carrying, training):
    # In training the state's size comes from x: the size check must come before a state of a
    # negative size is made ("zeros: Dimension size must be non-negative") or compared with the
    # carried one (a "call reset_state()" that cannot help).
    cell = (BConvCellV2 if v2 else BConvCell)(3, 4, kernel_size=5)
    if carrying:
        cell(torch.randn(2, 3, 8, 8))
    cell.train(training)
    with pytest.raises(
        ValueError, match=r"x's spatial size 3x3 is too small for kernel_size=5 with padding=0"
    ):
        cell(torch.randn(2, 3, 3, 3))
    kept = cell.state if cell.state is None or v2 is False else cell.state[0]
    assert (kept is None) != carrying and (kept is None or kept.shape == (2, 4, 4, 4)), "state untouched"


def test_parameter_shapes_and_defaults():
    c1 = BConvCell(3, 4)
    assert c1.weight.shape == (16, 3, 3, 3) and c1.bias is None and c1.state is None
    c2 = BConvCellV2(3, 4, kernel_size=5, bias=True)
    assert c2.weight.shape == (16, 6, 5, 5) and c2.weight_rec.shape == (4, 3, 5, 5)
    assert c2.bias.shape == (16,) and c2.bias_rec.shape == (3,)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_module_under_torch_compile(v2):
    torch._dynamo.reset()
    cell, ref = (BConvCellV2 if v2 else BConvCell)(3, 4, padding=1), None
    ref = copy.deepcopy(cell)
    compiled = torch.compile(cell)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(compiled(x), ref(x))
    for s, s_ref in zip(_states(cell.state), _states(ref.state), strict=True):
        torch.testing.assert_close(s, s_ref)


def _checkpointed(fn, x, mode):
    """fn(x) under torch.utils.checkpoint: 'reentrant', 'non_reentrant', or 'nested' (a
    reentrant checkpoint inside a non-reentrant one: the inner forward re-runs under no_grad)."""
    from torch.utils.checkpoint import checkpoint

    if mode == "nested":
        return checkpoint(lambda t: checkpoint(fn, t, use_reentrant=True), x, use_reentrant=False)
    return checkpoint(fn, x, use_reentrant=mode == "reentrant")


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_a_training_cell_in_a_data_parallel_replica_is_a_clear_error(v2):
    # nn.DataParallel on more than one GPU runs fresh replicas each forward and drops them: the
    # state would silently never carry. Its replicate() marks every module copy as below (the
    # real one needs two GPUs: tests/test_gpu.py).
    net = nn.Sequential(nn.Conv2d(3, 3, 1), _make(v2, "cpu")).double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)

    def replica():
        r = copy.deepcopy(net)
        for m in r.modules():
            m._is_replica = True
        return r

    with pytest.raises(RuntimeError, match="replica made by nn.DataParallel.*DistributedDataParallel"):
        replica()(x)
    net.eval()  # nothing is carried in eval: a replica gives the module's own output
    torch.testing.assert_close(replica()(x), net(x))


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant", "nested"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_activation_checkpointing_a_training_cell_is_a_clear_error(v2, mode):
    # The re-run would read the state its first run advanced (before: weight gradients off by
    # 26%, silently); whatever the nesting, backward refuses it.
    block = nn.Sequential(nn.Conv2d(3, 3, 1), _make(v2, "cpu")).double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    y = _checkpointed(block, x, mode)
    with pytest.raises(RuntimeError, match="training forward is running inside backward"):
        y.sum().backward()


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_activation_checkpointing_an_eval_cell_gives_the_plain_gradients(v2, mode):
    block = nn.Sequential(nn.Conv2d(3, 3, 1), _make(v2, "cpu")).double().eval()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    (_checkpointed(block, x.clone().requires_grad_(), mode) ** 2).sum().backward()
    (ref(x) ** 2).sum().backward()
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev", "jvp"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_a_training_cell_under_a_torch_func_transform_is_a_clear_error(v2, transform):
    # Before: v2 failed inside torch on its count buffer; v1 stored the transform's wrapper
    # as its state, so the next call (or a deepcopy, a pickle) failed inside torch.
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    cell = _make(v2, "cpu").double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    cell(x)
    before = [s.clone() for s in (cell.state if v2 else (cell.state,))]
    params = dict(cell.named_parameters())
    calls = {
        "grad": lambda: grad(lambda p: functional_call(cell, p, (x,)).sum())(params),
        "vmap": lambda: vmap(cell)(x.unsqueeze(1)),
        "jacrev": lambda: jacrev(cell)(x),
        "jvp": lambda: jvp(cell, (x,), (torch.ones_like(x),)),
    }
    with pytest.raises(RuntimeError, match="training forward under a torch.func transform"):
        calls[transform]()
    after = cell.state if v2 else (cell.state,)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "state untouched"
    copy.deepcopy(cell)(x)  # and the cell goes on as before
    cell.eval()  # eval carries nothing: the transform's own derivative of the shortcut
    g = grad(lambda t: cell(t).sum())(x)
    t = x.clone().requires_grad_()
    cell(t).sum().backward()
    torch.testing.assert_close(g, t.grad)


def test_running_mean_count_survives_a_failed_call_and_to_empty():
    cell = BConvCellV2(2, 2, 1)
    with pytest.raises(
        TypeError, match="weight is torch.float32 but x is torch.float64"
    ):  # nothing may advance
        cell(torch.randn(1, 2, 3, 3, dtype=torch.float64))
    assert int(cell.num_batches) == 0
    with torch.device("meta"):
        lazy = BConvCellV2(2, 2, 1)
    lazy.to_empty(device="cpu").load_state_dict(cell.state_dict())
    lazy.num_batches.fill_(12345)  # to_empty leaves the non-persistent buffer uninitialised
    x = torch.randn(1, 2, 3, 3)
    for _ in range(2):
        torch.testing.assert_close(lazy(x), cell(x))
    for s, s_ref in zip(lazy.state, cell.state, strict=True):
        torch.testing.assert_close(s, s_ref)
    assert int(lazy.num_batches) == int(cell.num_batches) == 2


@pytest.mark.parametrize(
    ("first", "then"), [("eager", "eager"), ("eager", "compiled"), ("compiled", "eager")]
)  # compiled, then compiled: still refused inside torch (torch.compile cannot trace is_inference)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_training_forward_under_inference_mode_then_training(v2, first, then):
    # A state written under inference_mode is an inference tensor, which autograd may not save:
    # an eager forward keeps a normal copy, and an eager read copies what a compiled one left.
    torch._dynamo.reset()
    cell = (BConvCellV2 if v2 else BConvCell)(2, 2, 1)
    compiled = torch.compile(cell)
    with torch.inference_mode():
        (compiled if first == "compiled" else cell)(torch.randn(4, 2, 3, 3))
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    (compiled if then == "compiled" else cell)(x).sum().backward()
    assert x.grad is not None
