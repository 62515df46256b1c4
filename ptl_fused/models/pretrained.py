"""Loading a torchvision state dict from a local file into a backbone (nothing is downloaded)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ptl_fused._torch_load import why_unreadable
from ptl_fused._validate import few

# torchvision's published DenseNet files name "norm.1" what the model calls "norm1" (see
# torchvision.models.densenet._load_state_dict); the same renaming lets those files load here.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def load_backbone_weights(model: nn.Module, stages: Sequence[nn.Module], path: str | os.PathLike) -> None:
    """Load the torchvision state dict at `path` into `model`, strictly on the keys of its
    `stages` (the backbone proper); the file's other keys of `model` (fc, classifier) are ignored.

    Raises FileNotFoundError (no such file) or ValueError naming the file (unreadable, not a
    state dict, missing/unknown keys, wrong shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read pretrained weights from {path!r} (expected a torch.save'd state dict): "
            f"{why_unreadable(e)}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} is not a state dict (a mapping from parameter names to tensors)")
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    own = model.state_dict()
    stage_tensors = {id(t) for s in stages for t in (*s.parameters(), *s.buffers())}
    needed = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in stage_tensors}
    if not needed:
        raise ValueError(
            f"none of the stages' tensors belong to the {type(model).__name__} to load {path!r} into: "
            "the stages must be that model's own modules"
        )
    # Files older than BN's num_batches_tracked (torchvision's published ResNet/DenseNet files)
    # lack it; BatchNorm keeps its own counter then, as torchvision's loaders do.
    needed = {k for k in needed if k in state or not k.endswith(".num_batches_tracked")}
    missing, unknown = sorted(needed - state.keys()), sorted(state.keys() - own.keys())
    if missing or unknown:
        raise ValueError(
            f"{path!r} does not match the {type(model).__name__} backbone: missing keys {few(missing)}, "
            f"unexpected keys {few(unknown)} (expected a torchvision state dict of this architecture)"
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(needed)
        if state[k].shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{path!r} has tensors of the wrong shape for this backbone: {few(wrong)}")
    model.load_state_dict({k: state[k] for k in needed}, strict=False)


def warn_random_init(what: str) -> None:
    warnings.warn(
        f"{what}: pretrained=None, so the backbone is randomly initialised; pass pretrained=PATH "
        "(a local torchvision state dict) to start from ImageNet weights",
        UserWarning,
        stacklevel=3,
    )
