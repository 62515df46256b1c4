"""The engine under DistributedDataParallel: 2 gloo processes on the CPU. Weights agree across
ranks; each rank carries its own cell state unless ddp.state_sync=mean averages it."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import TinyNet, digits_cfg

from ptl_fused.engine import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, sync: str, results, epochs=2, resume=None) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    built = []

    def build(model_cfg, n):
        built.append(TinyNet(n, model_cfg["cell"]))
        return built[-1]

    from pathlib import Path

    cfg = digits_cfg(Path(out), f"optim.epochs={epochs}", "model.cell=v2", f"ddp.state_sync={sync}")
    res = run(cfg, resume=resume, build=build, verbose=False)
    # Rank 0 writes the stage's files; no rank may return before they exist (the digits job's
    # rank 1 read weights.pt at once and failed).
    weights_written = (Path(res["stages"][0]["folder"]) / "weights.pt").is_file()
    model = built[0]
    c, h = model.cell.state
    results[rank] = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "state": (c.clone(), h.clone()),
        "history": res["stages"][0]["history"],
        "weights_written": weights_written,
    }
    dist.destroy_process_group()


def _run(tmp_path, sync: str, epochs: int = 2, resume: str | None = None) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        args = (2, _free_port(), str(tmp_path / sync), sync, results, epochs, resume)
        mp.spawn(_worker, args=args, nprocs=2, join=True)
        return dict(results)


def test_two_gloo_ranks_state_sync_mean_and_none(tmp_path):
    for sync in ("none", "mean"):
        r = _run(tmp_path, sync)
        p0, p1 = r[0]["params"], r[1]["params"]
        assert p0.keys() == p1.keys()
        for k in p0:  # gradients are all-reduced: the weights agree exactly
            torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0, msg=k)
        (c0, h0), (c1, h1) = r[0]["state"], r[1]["state"]
        if sync == "mean":
            assert torch.equal(c0, c1) and torch.equal(h0, h1), "state_sync=mean: one state for all ranks"
        else:
            assert not torch.allclose(c0, c1), "each rank carries the state of its own batches"
        # rank 0 alone writes logs and checkpoints; the train loss is the mean over both ranks
        assert (tmp_path / sync / "run" / "last.pt").is_file()
        assert r[0]["history"][-1]["train_loss"] == r[1]["history"][-1]["train_loss"]
        # Rank 0 alone evaluates; every rank returns its metrics (rank 1 had none, and the
        # digits job's rank 1 failed on final["test_accuracy"]).
        assert "test_accuracy" in r[0]["history"][-1] and r[1]["history"] == r[0]["history"]
        assert r[0]["weights_written"] and r[1]["weights_written"]


def test_two_gloo_ranks_resume_exactly(tmp_path):
    # Each rank draws its own random numbers (dropout: seeds differ by rank); a resumed run must
    # give every rank back its own stream, so the weights equal an uninterrupted run's.
    straight = _run(tmp_path / "straight", "none", epochs=2)
    _run(tmp_path / "resumed", "none", epochs=1)
    resumed = _run(tmp_path / "resumed", "none", epochs=2, resume="auto")
    for rank in (0, 1):
        a, b = straight[rank]["params"], resumed[rank]["params"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"rank {rank} {k}")
        assert [h["test_accuracy"] for h in resumed[rank]["history"]] == [
            h["test_accuracy"] for h in straight[0]["history"]
        ]


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("gloo", "cpu"),
        pytest.param(
            "nccl",
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
            ],
        ),
    ],
)
def test_one_process_group_runs_every_collective_as_training_alone(tmp_path, monkeypatch, backend, device):
    # A process group of one runs the DDP code (every collective) and trains as a run alone does.
    # With NCCL (one GPU suffices) this is the check that every collective gets tensors it can
    # reduce: the epoch totals were reduced on the CPU, which NCCL refuses.
    def train(folder):
        torch.manual_seed(0)
        cfg = digits_cfg(
            tmp_path / folder,
            "model.cell=v2",
            "ddp.state_sync=mean",
            f"device={device}",
            "deterministic=true",
        )
        return run(cfg, build=lambda model_cfg, n: TinyNet(n, model_cfg["cell"]), verbose=False)

    # deterministic=true (a flipped prediction would change the accuracy) is process-wide: the
    # other tests in this process get the setting they had back.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        alone = train("alone")
        grouped = _grouped(train, backend, tmp_path, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(was)
    calls = grouped.pop("calls")
    assert {"all_reduce", "all_gather_object", "barrier"} <= set(calls), calls
    a, g = alone["stages"][0]["history"], grouped["stages"][0]["history"]
    assert [r.keys() for r in g] == [r.keys() for r in a]
    for ra, rg in zip(a, g, strict=True):
        for k in ("train_loss", "test_accuracy"):
            assert rg[k] == pytest.approx(ra[k], rel=0 if device == "cpu" else 1e-6), k


def test_an_nccl_group_with_cpu_training_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # A user's script joined NCCL (the GPU machine's default) and the config says device=cpu:
    # NCCL cannot reduce CPU tensors. Seen as joined without a GPU: the group is stood in for.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    cfg = digits_cfg(tmp_path / "out", "device=cpu")
    with pytest.raises(ValueError, match=r"joined with NCCL, .* trains on cpu: set device=cuda"):
        run(cfg, build=lambda model_cfg, n: TinyNet(n, model_cfg["cell"]), verbose=False)
    assert not (tmp_path / "out").exists()


def _grouped(train, backend: str, tmp_path, monkeypatch) -> dict:
    """train("grouped") in a process group of one, counting the collectives it calls."""
    calls = []
    for name in ("all_reduce", "all_gather_object", "barrier"):
        real = getattr(dist, name)
        monkeypatch.setattr(
            dist, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1]
        )
    # A file rendezvous: no port to collide with another test process's (pytest-xdist).
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        return {**train("grouped"), "calls": calls}
    finally:
        dist.destroy_process_group()
