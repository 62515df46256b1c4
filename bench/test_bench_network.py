"""Whole-network rows: one PTLNet (ResNet-50 at 256x128, the paper's ReID setting) training
step and inference step per cell backend, beside the plain backbone with the same head.

The cells' share of the FLOPs is reported beside the time overhead, so that the efficiency of
the cells can be judged against the backbone's (GPU target of the verification issue: time
overhead <= 1.2x the FLOP share). Batch: 32 on a GPU (bf16 autocast), 4 on the CPU (fp32).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ptl_fused
from ptl_fused.models import build_model

from conftest import bench_device, memory_format, run_rounds
from test_bench_cell import BACKEND_IMPLS

DEVICE = bench_device()
ARCH, INPUT, CLASSES = "resnet50", (256, 128), 751  # Market-1501's training identities
BATCH = 32 if DEVICE.type == "cuda" else 4
IMPLS = ["baseline", "reference", *BACKEND_IMPLS]


@functools.cache
def model(ptl: bool) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init: no pretrained file needed to time a step
        torch.manual_seed(0)
        net = build_model(ARCH, CLASSES, cell="v1" if ptl else None, input_size=INPUT)
        return net.to(DEVICE, memory_format=memory_format())


def with_backend(impl: str) -> torch.nn.Module:
    net = model(impl != "baseline")
    for m in net.modules():
        if isinstance(m, (ptl_fused.BConvCell, ptl_fused.BConvCellV2)):
            m.backend = impl
    return net


@functools.cache
def forward_flops(ptl: bool) -> int:
    """FLOPs of one training forward (cells through the reference backend, so that their
    convolutions are visible to the counter), on a copy: the timed rows' model keeps its
    backend and mode."""
    net = copy.deepcopy(model(ptl)).train()
    for m in net.modules():
        if isinstance(m, (ptl_fused.BConvCell, ptl_fused.BConvCellV2)):
            m.backend = "reference"
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.randn(BATCH, 3, *INPUT, device=DEVICE))
    return counter.get_total_flops()


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("pass_", ["train", "infer"])
@pytest.mark.parametrize("impl", IMPLS)
def test_network_step(benchmark, impl, pass_, repeat):
    net = with_backend(impl)
    x = torch.randn(BATCH, 3, *INPUT, device=DEVICE).contiguous(memory_format=memory_format())
    labels = torch.randint(0, CLASSES, (BATCH,), device=DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    amp = torch.autocast("cuda", torch.bfloat16, enabled=DEVICE.type == "cuda")

    def train_step():
        with amp:
            out = net(x)
            loss = sum(torch.nn.functional.cross_entropy(lg, labels) for lg in out.logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync()

    def infer_step():
        with torch.no_grad(), amp:
            out = net(x).feature
        _sync()
        return out

    net.train(pass_ == "train")
    ptl_fused.reset_states(net)
    step = train_step if pass_ == "train" else infer_step
    step()  # warm-up (and the state every later training step carries)
    ptl, base = forward_flops(True), forward_flops(False)
    benchmark.group = f"network {ARCH} {pass_}"
    benchmark.extra_info.update(
        net_impl=impl,
        pass_=pass_,
        repeat=repeat,
        batch=BATCH,
        input=f"{INPUT[0]}x{INPUT[1]}",
        device=DEVICE.type,
        dtype="bfloat16" if DEVICE.type == "cuda" else "float32",
        cell_flop_share=(ptl - base) / base,
    )
    run_rounds(benchmark, step)
    net.train()
