"""ptl-train: train from a YAML config with key.sub=value overrides.

ptl-train                                  # the main job: digits transfer (configs/digits.yaml)
ptl-train market1501_resnet50_ptl data.root=/data/Market-1501-v15.09.15 --pretrained resnet50.pth
ptl-train my.yaml optim.lr=0.02 --resume auto
torchrun --nproc_per_node 2 -m ptl_fused.engine cifar10_densenet100_ptl data.root=/data/cifar
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, config_dir, load_config
from .trainer import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml")))
    p = argparse.ArgumentParser(
        prog="ptl-train",
        description="Progressive Transfer Learning training. With no config, runs the main job "
        "(transfer learning on scikit-learn's digits, about 1.5 minutes on 2 CPU cores).",
        epilog=f"bundled configs: {names}",
    )
    p.add_argument(
        "args",
        nargs="*",
        help="[CONFIG] then overrides key.sub=value (values read as YAML; paths as written)",
    )
    p.add_argument(
        "--resume", metavar="PATH|auto", help="continue from a checkpoint; auto: the last one in out"
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (the config's `quick` overrides)")
    p.add_argument("--out", help="output folder (same as out=DIR)")
    p.add_argument(
        "--pretrained", metavar="PATH", help="local torchvision state dict (same as model.pretrained=PATH)"
    )
    p.add_argument(
        "--traceback",
        action="store_true",
        help="show the traceback of an error (by default a config, data or checkpoint error is one line)",
    )
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    config, overrides = None, list(a.args)
    if overrides and _is_config(overrides[0]):
        config = overrides.pop(0)
    if a.resume not in (None, "auto"):
        a.resume = os.path.expanduser(a.resume)
    if a.out is not None:
        overrides.append(f"out={a.out}")
    if a.pretrained is not None:
        overrides.append(f"model.pretrained={a.pretrained}")
    try:
        cfg = load_config(config or "digits", overrides, quick=a.quick)
        if cfg["job"] == "digits_transfer":
            if any(o.partition("=")[0].strip() == "optim.epochs" for o in overrides):
                raise ConfigError(
                    "optim.epochs: the digits job sets each run's epochs itself; override "
                    "digits.pretrain_epochs and digits.transfer_epochs instead"
                )
            from .digits_job import run_digits_job

            run_digits_job(cfg, resume=a.resume)
        else:
            run(cfg, resume=a.resume)
    except USER_ERRORS as e:
        if a.traceback:
            raise
        print(f"ptl-train: error: {one_line(e)} (--traceback shows where)", file=sys.stderr)
        return 2
    return 0


def _is_config(arg: str) -> bool:
    """The first argument names the config unless it is an override. A YAML file's path may hold
    an "=" (a sweep folder lr=0.1/): an existing file is the config, and so is a path whose part
    before the "=" holds a "/", which no override key does."""
    key = arg.partition("=")[0]
    return "=" not in arg or Path(arg).is_file() or "/" in key or os.sep in key


# What a user can fix (a config, a path, a dataset, a checkpoint): one line, exit status 2.
# Anything else is a bug and keeps its traceback. (ConfigError is a ValueError; FileNotFoundError
# and NotADirectoryError are OSErrors, as is an unreadable image.)
USER_ERRORS = (ConfigError, CheckpointError, ValueError, OSError)


def one_line(e: BaseException) -> str:
    """The message on one line; for an error re-raised from a DataLoader worker, only the
    original error's last line, not the worker's traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "Original Traceback (most recent call last):" in lines:
        lines = lines[-1:]
    return " ".join(lines) or type(e).__name__
