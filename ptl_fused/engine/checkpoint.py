"""Checkpoints: written atomically, read back with clear errors, RNG states included.

A checkpoint holds the model, optimizer, LR scheduler and GradScaler states, the stage and
epoch just finished, every rank's RNG states (python, numpy, torch, cuda) and the config (the stage's
and the whole run's: a resumed run must have the same settings, see check_resume). The cells'
carried state is *not* saved: it is reset at the start of every epoch (DESIGN.md §1), and a
checkpoint is written at an epoch's end, so a resumed run starts its next epoch from the same
(initial) state as an uninterrupted one.
"""

from __future__ import annotations

import glob
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptl_fused._torch_load import why_unreadable

from .config import num_stages, resume_differences, stage_config

FORMAT = "ptl_fused.engine.checkpoint/1"
# What must agree between a checkpoint and the model it is loaded into.
IDENTITY_KEYS = ("arch", "cell", "head", "num_classes")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another model."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash at
    any moment leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _remove_stale_temps(path)


# A temporary file untouched this long, whose writer is not a live process here, was left by a
# killed run (kill -9, a node lost): the age spares a writer on another machine sharing the folder.
STALE_TEMP_S = 60.0


def _remove_stale_temps(path: Path) -> None:
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        try:
            if not pid.isdigit() or _alive(int(pid)) or time.time() - tmp.stat().st_mtime < STALE_TEMP_S:
                continue
            tmp.unlink()
        except FileNotFoundError:  # another writer's, renamed or removed meanwhile
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def capture_rng() -> dict:
    """Every RNG the training loop draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng(ckpt: dict, rank: int, world: int) -> dict:
    """The RNG state `rank` saved (rank 0's for a checkpoint of another world size, or one
    written before every rank's was saved)."""
    saved = ckpt["rng"]
    ranks = saved if isinstance(saved, list) else [saved]  # a dict: rank 0's alone
    return ranks[rank] if len(ranks) == world else ranks[0]


def restore_rng(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    stage: int,
    epoch: int,
    meta: dict,
    config: dict,
    history: list[dict],
    previous_stages: list[dict] = (),
    run_config: dict | None = None,
    pending_eval: bool = False,
    other_ranks_rng: list[dict] = (),
) -> None:
    """Write the state after `epoch` (1-based, completed) of `stage`. meta: IDENTITY_KEYS;
    config: the stage's config; run_config: the whole run's (every stage; check_resume compares
    it with a resumed run's); previous_stages: the results of the stages before this one
    (sequential fine-tuning); pending_eval: written before the epoch's evaluation (its metrics
    are not in `history` yet, the RNG states are those the evaluation starts from);
    other_ranks_rng: under DDP, ranks 1.. RNG states (capture_rng), saved beside this process's
    so that every rank resumes its own random stream (rank_rng)."""
    atomic_save(
        {
            "format": FORMAT,
            "meta": meta,
            "stage": stage,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": [capture_rng(), *other_ranks_rng],  # one per rank
            "config": config,
            "run_config": run_config,
            "history": history,
            "previous_stages": list(previous_stages),
            "pending_eval": pending_eval,
        },
        path,
    )


def load_checkpoint(path: str | Path, expect: dict | None = None) -> dict:
    """Read a checkpoint onto the CPU; a truncated/corrupt file, or one whose IDENTITY_KEYS
    differ from `expect`, raises CheckpointError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a checkpoint file: give the file itself (a run's "
            f"last checkpoint is {path / 'last.pt'})"
        )
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or corrupt file?): {why_unreadable(e)}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a ptl_fused engine checkpoint (expected a dict with format={FORMAT!r})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:  # made by hand, or by another tool that set the format
        raise CheckpointError(f"checkpoint {path} lacks {missing} (not written by this engine?)")
    if expect is not None:
        check_identity(ckpt, path, expect)
    return ckpt


# What a resume and an STD teacher read (the optional keys came later and have defaults).
REQUIRED_KEYS = (
    "meta",
    "stage",
    "epoch",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "config",
    "history",
)


def check_identity(ckpt: dict, path: str | Path, expect: dict) -> None:
    diffs = [
        f"{k}: checkpoint has {ckpt['meta'].get(k)!r}, this run has {expect[k]!r}"
        for k in IDENTITY_KEYS
        if k in expect and ckpt["meta"].get(k) != expect[k]
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved for another model; " + "; ".join(diffs))


def check_resume(ckpt: dict, path: str | Path, cfg: dict) -> None:
    """A resumed run continues the saved one exactly: every setting of the stages done or under
    way must be the checkpoint's, except config.RESUME_MAY_CHANGE (paths, logging, evaluation,
    device, and optim.epochs of the stage being resumed, which may grow to extend it). Raises
    CheckpointError listing each difference (checkpoint value vs requested)."""
    stage, saved_run = ckpt["stage"], ckpt.get("run_config")
    diffs = []
    for t in range(stage + 1):
        if saved_run is not None:
            saved = stage_config(saved_run, t)
        elif t == stage:  # written before run_config was saved: only the current stage's config
            saved = ckpt["config"]
        else:
            continue
        # A finished stage ran its epochs; the stage under way may be extended or ended early (not
        # below the epochs done, checked next).
        keep = ("optim.epochs",) if t < stage else ()
        where = f"stage {t + 1} " if num_stages(cfg) > 1 else ""
        requested = stage_config(cfg, t)
        diffs += [
            f"{where}{k}: checkpoint {a!r}, requested {b!r}"
            for k, a, b in resume_differences(saved, requested, keep)
        ]
        if t == stage and requested["optim"]["epochs"] < ckpt["epoch"]:
            diffs.append(
                f"{where}optim.epochs: the checkpoint has {ckpt['epoch']} epochs done, requested "
                f"{requested['optim']['epochs']}"
            )
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: a resumed run continues the saved run exactly, and these "
            f"settings differ from it: {'; '.join(diffs)}. To continue the saved run, resume with its "
            "settings (remove the override or config edit that changes them); or start a new run with "
            "another out= (and no --resume). Only paths (out, data.root, model.pretrained, std.teacher), "
            "data.num_workers, device, deterministic, model.recompute, eval.*, "
            "train.progress/tensorboard and optim.epochs (to extend training) may change on resume"
        )


def load_model_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict(strict) with the file named in the error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
