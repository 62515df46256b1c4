"""GPU-only checks: CUDA-graph capture/replay of a training step with carried state, and of
the eval shortcut; the raw ops refuse a CPU tensor beside a CUDA x.

(The equivalence, gradcheck, compile and autocast suites run on the GPU through their
cuda parametrisations; these are skipped, with the reason, where no GPU is present.)
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from ptl_fused import BConvCell, BConvCellV2, available_backends, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

GPU_BACKENDS = [b for b in ("cuda", "cuda_igemm", "triton", "reference") if b in available_backends()]


def test_every_gpu_backend_is_available():
    # GPU_BACKENDS (and every cuda parametrisation) leaves out what is unavailable, skipped with
    # its reason: on a GPU machine a missing backend must fail here instead.
    from ptl_fused import _extension
    from ptl_fused.backends import BACKENDS

    want = ["triton"] + ([] if os.environ.get("PTL_FUSED_WITH_CUDA") == "0" else ["cuda", "cuda_igemm"])
    missing = {b: BACKENDS[b].unavailable() for b in want if b not in available_backends()}
    assert not missing, f"{missing} (extension load error: {_extension.LOAD_ERROR})"


def _model(v2: bool, backend: str, recompute: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cls = BConvCellV2 if v2 else BConvCell
    kw = dict(backend=backend, recompute=recompute)
    return nn.Sequential(cls(3, 8, padding=1, **kw), nn.ReLU(), cls(8, 4, stride=2, padding=1, **kw)).cuda()


@pytest.mark.parametrize("recompute", [False, True], ids=["saving", "recomputing"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_training_step_carries_state(backend, v2, recompute):
    # Recomputing: backward runs the forward op again, inside the captured graph too.
    graphed, eager = _model(v2, backend, recompute), None
    eager = copy.deepcopy(graphed)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    data = [torch.randn(4, 3, 9, 7, device="cuda") for _ in range(8)]
    static_x = torch.empty_like(data[0])

    def step(model, opt, x):
        opt.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    # Warm-up on a side stream (allocates the state and the grads), as CUDA graphs require.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in data[:3]:
            static_x.copy_(x)
            step(graphed, opt_g, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for x in data[:3]:
        step(eager, opt_e, x)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_g, static_x)
    for x in data[3:]:
        static_x.copy_(x)
        graph.replay()
        loss = step(eager, opt_e, x)
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    for cell_g, cell_e in zip(graphed[::2], eager[::2], strict=True):
        states_g = cell_g.state if isinstance(cell_g.state, tuple) else (cell_g.state,)
        states_e = cell_e.state if isinstance(cell_e.state, tuple) else (cell_e.state,)
        for a, b in zip(states_g, states_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_eval_shortcut(backend, v2):
    # The captured graph takes the gate rows (and v2's gate map) from the parameters and runs
    # the shortcut; a replay must equal an eager eval call.
    model = _model(v2, backend).eval()
    static_x = torch.randn(4, 3, 9, 7, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_while_the_first_is_current(backend, v2):
    # Triton launches on the current device unless told; the C++ backend guards itself.
    from cells import CASES, check_cell, make_inputs

    assert torch.cuda.current_device() == 0
    case = CASES[1]
    check_cell(backend, "cuda:1", case, v2, torch.float32, make_inputs(case, v2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_data_parallel_over_two_gpus_refuses_training_and_runs_eval(v2):
    net = _model(v2, "auto")
    x = torch.randn(4, 3, 9, 7, device="cuda")
    dp = nn.DataParallel(net, device_ids=[0, 1])
    with pytest.raises(RuntimeError, match="replica made by nn.DataParallel"):
        dp(x)
    dp.eval()  # each replica gets half the batch: compare like with like (cuDNN picks by shape)
    torch.testing.assert_close(dp(x), torch.cat([net(x[:2]), net(x[2:])]))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_v2_op_with_a_float_h_alpha_captures_in_a_cuda_graph(backend):
    # A Python h_alpha becomes a device scalar without a host copy (a copy would fail capture).
    g = torch.Generator(device="cuda").manual_seed(0)
    x, c, h = (torch.randn(2, n, 7, 5, device="cuda", generator=g) for n in (3, 4, 4))
    w, wr = (
        torch.randn(16, 6, 3, 3, device="cuda", generator=g),
        torch.randn(4, 3, 3, 3, device="cuda", generator=g),
    )

    def cell():
        return ops.bconv_cell_v2(x, w, None, wr, None, c, h, 0.25, stride=1, padding=1, backend=backend)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            cell()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = cell()
        x.copy_(torch.randn_like(x))
        graph.replay()
        for a, b in zip(static, cell(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _triton_compiles() -> int:
    """Kernels Triton has compiled so far for the backend's three JIT functions."""
    from ptl_fused.triton import backward, forward, recovery

    kernels = (forward.bconv_cell_fwd_kernel, recovery.recovery_kernel, backward.bconv_cell_bwd_kernel)
    jits = [getattr(k, "fn", k) for k in kernels]  # the autotuner's function, or the kernel
    return sum(len(entry[0]) for fn in jits for entry in fn.device_caches.values())


@pytest.mark.skipif("triton" not in available_backends(), reason="the triton backend is unavailable")
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_triton_compiles_once_over_batch_sizes(v2):
    # The compile-side twin of tests/test_triton_compile.py's launcher check: an epoch's odd
    # last batch, a batch of 1 and a 16-divisible one run the kernels compiled for the first.
    cell = (BConvCellV2 if v2 else BConvCell)(8, 8, padding=1, backend="triton").cuda()

    def step(batch):
        cell.reset_state()
        cell(torch.randn(batch, 8, 9, 7, device="cuda", requires_grad=True)).sum().backward()
        cell.train(False)
        with torch.no_grad():
            cell(torch.randn(batch, 8, 9, 7, device="cuda"))
        cell.train(True)

    step(5)
    compiled = _triton_compiles()
    for batch in (1, 16, 17, 32):
        step(batch)
    assert _triton_compiles() == compiled


@pytest.mark.parametrize("backend", [b for b in ("cuda_igemm", "triton") if b in GPU_BACKENDS])
def test_a_fused_forward_without_backward_allocates_no_gates(backend):
    # The fused kernels write the gates straight to memory; with no backward to come there is
    # no (B, 4·Cout, Ho, Wo) buffer at all (backend "cuda" has it anyway: the conv's output).
    b, cin, cout, hw = 8, 16, 16, 64
    x = torch.randn(b, cin, hw, hw, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(4 * cout, cin, 3, 3, device="cuda") * 0.1).bfloat16()
    c = torch.zeros(b, cout, hw, hw, device="cuda")
    outputs = b * cout * hw * hw * (2 + 4)  # y (bf16) and C_b (fp32)
    gates = b * 4 * cout * hw * hw * 2

    def peak(requires_grad: bool) -> int:
        w.requires_grad_(requires_grad)
        ops.bconv_cell(x, w, None, c, 1, 1, backend=backend)  # warm-up: compile, tune
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = ops.bconv_cell(x, w, None, c, 1, 1, backend=backend)
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before

    assert peak(True) >= outputs + gates  # the check can fail: a training forward keeps them
    assert peak(False) < outputs + gates // 4, peak(False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_engine_trains_with_amp_on_the_gpu(tmp_path, amp):
    # The trainer's GPU path: autocast (GradScaler for fp16) with the cells' float32 state.
    from ptl_fused.engine import load_config, run

    cfg = load_config(
        "digits",
        [
            "job=train",
            "device=cuda",
            f"amp={amp}",
            "optim.epochs=3",
            f"out={tmp_path}",
            "train.progress=false",
        ],
    )
    final = run(cfg, verbose=False)["stages"][-1]["final"]
    assert final["test_accuracy"] > 50, final  # 10 digits: chance is 10%


@pytest.mark.parametrize("fused_gemm", [False, True], ids=["cudnn", "igemm"])
@pytest.mark.parametrize("name", ["weight", "bias", "c_prev", "weight_rec", "bias_rec", "h_prev", "h_alpha"])
def test_raw_ops_refuse_a_cpu_tensor_beside_a_cuda_x(name, fused_gemm):
    # The fused kernel reads every argument through a raw pointer: a CPU one must be an error
    # naming it, not an illegal address (ptl_fused.ops checks first; this is the raw op).
    if fused_gemm and "cuda_igemm" not in available_backends():
        pytest.skip("the extension was built without the CUDA kernels")
    dev = {"device": "cuda"}
    a = {
        "x": torch.randn(2, 3, 7, 5, **dev),
        "weight": torch.randn(16, 6, 3, 3, **dev),
        "bias": torch.randn(16, **dev),
        "weight_rec": torch.randn(4, 3, 3, 3, **dev),
        "bias_rec": torch.randn(4, **dev),
        "c_prev": torch.zeros(2, 4, 7, 5, **dev),
        "h_prev": torch.zeros(2, 4, 7, 5, **dev),
        "h_alpha": torch.ones(1, **dev),  # a CPU one would be a blocking copy, and break graph capture
    }
    a[name] = a[name].cpu()
    with pytest.raises(RuntimeError, match=rf"{name} is on cpu, (x|c_prev) on cuda"):
        torch.ops.ptl_fused.bconv_cell_v2_fwd(*a.values(), 1, 1, fused_gemm)
    if name in ("c_prev", "h_alpha"):  # the backward's inputs
        gates, grad = torch.rand(2, 16, 7, 5, **dev), torch.rand(2, 4, 7, 5, **dev)
        with pytest.raises(RuntimeError, match=rf"{name} is on cpu, (gates|c_prev) on cuda"):
            torch.ops.ptl_fused.bconv_cell_v2_bwd(grad, grad, grad, a["c_prev"], gates, a["h_alpha"])


@pytest.mark.parametrize("h", [2, 1])
def test_fused_raw_ops_refuse_an_input_smaller_than_the_kernel(h):
    # The implicit-GEMM path sizes its outputs itself (no ATen convolution to object first):
    # H = 2 with k = 3, p = 0, s = 2 truncates to Ho = 1 in C++ division unless checked.
    if "cuda_igemm" not in available_backends():
        pytest.skip("the extension was built without the CUDA kernels")
    x = torch.randn(1, 3, h, 5, device="cuda")
    w = torch.randn(16, 3, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="smaller than the kernel 3 with padding 0"):
        torch.ops.ptl_fused.bconv_cell_fwd(x, w, None, torch.zeros(1, 4, 1, 2, device="cuda"), 2, 0, True)
    with pytest.raises(RuntimeError, match="smaller than the kernel 3 with padding 0"):
        torch.ops.ptl_fused.bconv_cell_eval(x, w[:12], None, None, 2, 0, True)
