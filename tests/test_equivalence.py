"""Every backend against python_ref: forward, every gradient, all dtypes, layouts."""

from __future__ import annotations

import pytest
import torch

from cells import (
    CASES,
    CHANNELS_LAST_CASES,
    DTYPES,
    OUT_NAMES,
    WIDE_CASES,
    backend_params,
    cast_inputs,
    forward_backward,
    make_inputs,
    skip_unsupported,
)
from tolerances import assert_matches_oracle


def _check(backend, device, case, v2, dtype, master, layout=None):
    skip_unsupported(backend, device, dtype)
    oracle_out, oracle_grad = forward_backward("oracle", cast_inputs(master, torch.float64, "cpu"), case, v2)
    eager_out, eager_grad = forward_backward("oracle", cast_inputs(master, dtype, device), case, v2)
    args = cast_inputs(master, dtype, device)
    if layout is not None:
        args = layout(args)
    got_out, got_grad = forward_backward(backend, args, case, v2)
    for name, got, eager, oracle in zip(OUT_NAMES, got_out, eager_out, oracle_out, strict=False):
        want_dtype = dtype if name == "y" else (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.dtype == want_dtype, f"{name} is {got.dtype}, expected {want_dtype}"
        assert_matches_oracle(f"{case} {name}", got, eager, oracle, dtype)
    assert got_grad.keys() == oracle_grad.keys()
    for name in oracle_grad:
        assert got_grad[name] is not None, f"no gradient for {name}"
        assert_matches_oracle(f"{case} d{name}", got_grad[name], eager_grad[name], oracle_grad[name], dtype)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_forward_and_gradients_match_reference(backend, device, case, dtype, v2):
    _check(backend, device, case, v2, dtype, make_inputs(case, v2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cuda",)))
def test_wide_cells_on_gpu(backend, device, case, dtype, v2):
    _check(backend, device, case, v2, dtype, make_inputs(case, v2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", backend_params(device_types=("cuda",)))
def test_wide_cells_channels_last_on_gpu(backend, device, dtype, v2):
    case = WIDE_CASES[0]
    _check(backend, device, case, v2, dtype, make_inputs(case, v2), layout=_channels_last)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_without_bias(backend, device, v2):
    case = CASES[1]
    _check(backend, device, case, v2, torch.float32, make_inputs(case, v2, bias=False))


def _channels_last(args):
    return {
        n: t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        if isinstance(t, torch.Tensor) and t.dim() == 4
        else t
        for n, t in args.items()
    }


def _non_contiguous(args):
    # Every 4-D tensor becomes a strided view into a larger buffer.
    out = {}
    for n, t in args.items():
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
            big[..., ::2] = t.detach()
            big.requires_grad_()
            t = big[..., ::2]
            t.retain_grad()
        out[n] = t
    return out


@pytest.mark.parametrize("layout", [_channels_last, _non_contiguous], ids=["channels_last", "non_contiguous"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_layouts(backend, device, dtype, v2, layout):
    case = CASES[1]
    _check(backend, device, case, v2, dtype, make_inputs(case, v2), layout=layout)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_channels_last_whole_channel_groups(backend, device, dtype, case, v2):
    # The layout where the GPU kernels gather channel vectors (tap-major K order).
    _check(backend, device, case, v2, dtype, make_inputs(case, v2), layout=_channels_last)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_channels_last_in_channels_last_out(backend, device, v2):
    case = CASES[0]
    args = _channels_last(cast_inputs(make_inputs(case, v2), torch.float32, device))
    from cells import call

    for out in call(backend, args, case, v2):
        assert out.is_contiguous(memory_format=torch.channels_last) or backend == "reference"
