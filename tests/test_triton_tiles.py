"""Every GPU autotune tile of the Triton kernels computes the cell right (CPU interpreter).

Elsewhere the interpreter runs one 16x16x16 tile (forward._configs). On a GPU the autotuner
may pick any tile of forward.GPU_CONFIGS, and the tile sizes decide the masks of the partial
last tiles, how the K loop chunks Cin·k·k, and, tap-major, how many chunks one tap takes.
So each tile runs here against python_ref: forward, every gradient, the carried state, eval
(the backward epilogue with the GPU's block).
The interpreter has no warps or pipeline stages; tests/test_triton_compile.py compiles each
config, warps and stages included, for sm_90.
"""

from __future__ import annotations

import pytest
import torch

from ptl_fused.backends import BACKENDS

from cells import (
    CHANNELS_LAST_CASES,
    Case,
    cast_inputs,
    check_cell,
    eval_shortcut,
    make_inputs,
    to_channels_last,
    zero_state_reference,
)
from tolerances import assert_matches_oracle

triton_why = BACKENDS["triton"].unavailable()
if triton_why is None and torch.cuda.is_available():
    triton_why = "off where a GPU is (tests/conftest.py); the GPU tests run the tuned tiles"
pytestmark = pytest.mark.skipif(triton_why is not None, reason=f"Triton interpreter: {triton_why}")

if triton_why is None:
    from ptl_fused.triton import forward, ops, recovery

    GPU_CONFIGS = forward.GPU_CONFIGS
else:
    GPU_CONFIGS = []

# NCHW: partial tiles in M, N (Cout 70) and K; channels_last with Cin 64 and 128: one or more
# BLOCK_K chunks per tap of the tap-major K loop.
TILE_CASES = [
    pytest.param(Case(2, 40, 70, 13, 11, 3, 1, 1), None, id="B2-40to70-13x11-k3s1p1"),
    pytest.param(CHANNELS_LAST_CASES[1], to_channels_last, id=f"{CHANNELS_LAST_CASES[1]}-channels_last"),
    pytest.param(Case(2, 128, 20, 6, 5, 3, 2, 1), to_channels_last, id="B2-128to20-6x5-k3s2p1-channels_last"),
]


def _tile_id(cfg) -> str:
    return "M{BLOCK_M}N{BLOCK_N}K{BLOCK_K}".format(**cfg.kwargs)


@pytest.fixture(params=GPU_CONFIGS, ids=_tile_id)
def tile(request, monkeypatch):
    """Makes `request.param` the one config of every autotuned Triton kernel, and the backward
    epilogue's block the GPU's."""
    monkeypatch.setattr(ops, "BWD_BLOCK", ops.GPU_BWD_BLOCK)
    for kernel in (forward.bconv_cell_fwd_kernel, recovery.recovery_kernel):
        monkeypatch.setattr(kernel, "configs", [request.param])
    return request.param


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize(("case", "layout"), TILE_CASES)
def test_training_cell_on_every_gpu_tile(tile, case, layout, v2):
    check_cell("triton", "cpu", case, v2, torch.float32, make_inputs(case, v2), layout=layout)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize(("case", "layout"), TILE_CASES)
def test_eval_shortcut_on_every_gpu_tile(tile, case, layout, v2):
    master = make_inputs(case, v2)
    oracle = zero_state_reference(cast_inputs(master, torch.float64, "cpu", False), case, v2)
    eager = zero_state_reference(cast_inputs(master, torch.float32, "cpu", False), case, v2)
    args = cast_inputs(master, torch.float32, "cpu", False)
    if layout is not None:
        args = layout(args)
    got = eval_shortcut(args, case, v2, "triton")
    assert_matches_oracle(f"{case} eval y", got, eager, oracle, torch.float32)
