"""The cell-state rules of DESIGN.md §1, shared by the reference and every module.

- training carries the state from batch to batch, detached;
- position-wise: sample n of batch b meets row n of the carried state; a smaller batch
  uses rows [:B], a larger one starts its extra rows from the initial state;
- any other mismatch (channels, spatial size, device) is a ValueError;
- evaluation starts every batch from zeros and carries nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

STATE_INITS = ("zeros", "normal")
NORMAL_INIT_STD = 1e-3  # N(0, 0.001²), the authors' initial state


def initial_state(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, init: str = "zeros"
) -> Tensor:
    """A fresh state of ``shape`` (B, Cout, Ho, Wo): zeros, or N(0, 0.001²) for ``"normal"``."""
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if init == "normal":
        return torch.randn(shape, dtype=dtype, device=device) * NORMAL_INIT_STD
    raise ValueError(f"state_init must be one of {STATE_INITS}, got {init!r}")


def carry_state(
    state: Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    init: str = "zeros",
    name: str = "state",
) -> Tensor:
    """The previous state for a batch that needs ``shape`` (B, Cout, Ho, Wo), position-wise."""
    if state is None:
        return initial_state(shape, dtype, device, init)
    if tuple(state.shape[1:]) != tuple(shape[1:]):
        raise ValueError(
            f"carried {name} has shape {tuple(state.shape)} but this batch needs "
            f"(B, Cout, Ho, Wo) = {tuple(shape)}: channels or spatial size changed; "
            "call reset_state() (or ptl_fused.reset_states(model)) first"
        )
    if state.device != torch.device(device):
        raise ValueError(
            f"carried {name} is on {state.device} but the input is on {device}; "
            "call reset_state() after moving data to another device"
        )
    state = state.to(dtype)
    batch = shape[0]
    if state.shape[0] >= batch:
        return state[:batch]
    extra = initial_state((batch - state.shape[0], *shape[1:]), dtype, device, init)
    return torch.cat([state, extra], dim=0)
