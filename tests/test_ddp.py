"""DistributedDataParallel with 2 gloo processes on the CPU: each rank keeps its own state."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ptl_fused import BConvCell, BConvCellV2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = nn.Sequential(BConvCell(3, 4, padding=1), nn.ReLU(), BConvCellV2(4, 2, padding=1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(2):
        opt.zero_grad()
        ddp(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
    results[rank] = (
        model[0].state.clone(),
        [p.detach().clone() for p in model.parameters()],
    )
    dist.destroy_process_group()


def test_ddp_two_ranks_keep_their_own_state():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        (s0, p0), (s1, p1) = results[0], results[1]
    assert not torch.allclose(s0, s1), "each rank carries the state of its own batches"
    for a, b in zip(p0, p1, strict=True):
        torch.testing.assert_close(a, b)  # gradients were all-reduced: weights agree
