"""torchrun support: process group set-up (NCCL on GPU, gloo on CPU) and the optional
all-reduce of the cells' carried states (ddp.state_sync: mean)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ptl_fused import BConvCell, BConvCellV2


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # In a process group: the collectives run, also with one process (which is how a machine
    # with one GPU runs the NCCL path).
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of the process group, or of torchrun before it is joined (RANK), or alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1) or already joined."""
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return DistInfo()
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    elif dist.get_backend() == "nccl" and device_kind != "cuda":
        # Refused here, before any file is written: the first collective would fail later, in NCCL.
        raise ValueError(
            f"the process group was joined with NCCL, which reduces CUDA tensors only, but this "
            f"run trains on {device_kind}: set device=cuda, or join a gloo group for CPU training"
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def cells(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BConvCell, BConvCellV2))]


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t summed over the ranks, on t's device; reduced on `device`, the training device, as NCCL
    reduces CUDA tensors only."""
    on = t.to(device)
    dist.all_reduce(on, op=dist.ReduceOp.SUM)
    return on.to(t.device)


def sync_cell_states(model: nn.Module, world: int) -> None:
    """Replace every cell's state by its mean over the ranks (in place), so that the state
    summarises the global batch. Each rank's batch must have the same size (drop_last)."""
    for cell in cells(model):
        if cell.state is None:
            continue
        for t in (cell.state,) if isinstance(cell.state, torch.Tensor) else cell.state:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)


def gather_objects(obj, info: DistInfo) -> list:
    """[every rank's obj] in rank order, on every rank (a collective: all ranks must call it)."""
    if not info.joined:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.joined:
        dist.barrier()
