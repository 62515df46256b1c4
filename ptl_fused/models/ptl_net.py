"""PTLNet: a torchvision backbone wrapped by ptl_wrap, with a ReID or classification head."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torchvision import models as tvm

from .heads import HEADS, ModelOutput, check_num_classes
from .pretrained import load_backbone_weights, warn_random_init
from .ptl_wrap import PTLBackbone, ptl_wrap, resolve_stages


class PTLModel(nn.Module):
    """body (a PTLBackbone) + head: image (B, Cin, H, W) -> ModelOutput with feature (B, feat_dim).

    head: "reid" (three FC layers, heads.ReIDHead) or "classification" (two linear layers).
    """

    def __init__(
        self,
        body: PTLBackbone,
        num_classes: int,
        head: Literal["reid", "classification"] = "classification",
        feat_dim: int = 512,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        super().__init__()
        self.body = body
        self.head = HEADS[head](body.out_channels, feat_dim, num_classes)
        self.feature_dim = feat_dim

    def forward(self, x: Tensor) -> ModelOutput:
        return self.head(self.body(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for num_classes (sequential transfer: the
        backbone, cells and the rest of the head are kept)."""
        check_num_classes(num_classes)
        old = self.head.classifier
        self.head.classifier = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)


class PTLNet(PTLModel):
    """A torchvision CNN (`arch`, e.g. "resnet50", "densenet161", "mobilenet_v3_large") with PTL
    cells (cell="v1"/"v2") or plain (cell=None: the baseline, built by the same code with the
    same head). image (B, 3, H, W) -> ModelOutput; .feature is (B, feat_dim).

    pretrained: path of a local torchvision state dict for the backbone (its fc/classifier
    keys are ignored); None: random initialisation, with a warning. Nothing is downloaded.
    last_stride: stride of ResNet's layer4 (None: 1, the ReID convention); other backbones keep
    their own strides, so DenseNet-161 ends at 1/32 as in the paper.
    input_size: the image size the cell strides are fitted to (DESIGN.md: 256x128 for ReID).
    stages: "auto" (ResNet, DenseNet, MobileNet, EfficientNet, ConvNeXt, VGG), or the backbone's
    stage submodule names in order, for any other torchvision CNN (e.g. RegNet: "stem",
    "trunk_output.block1", ...).
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        cell: Literal["v1", "v2"] | None = "v1",
        head: Literal["reid", "classification"] = "reid",
        backend: str = "auto",
        pretrained: str | os.PathLike | None = None,
        last_stride: int | None = None,
        feat_dim: int = 512,
        input_size: tuple[int, int] = (256, 128),
        kernel_size: int = 3,
        state_init: str = "zeros",
        stages: Sequence[str] | Literal["auto"] = "auto",
    ) -> None:
        backbone = torchvision_backbone(arch)
        if not isinstance(stages, str) and any(isinstance(s, nn.Module) for s in stages):
            raise TypeError(
                "PTLNet builds its own backbone, so stages must name its submodules (e.g. ['stem', "
                "'trunk_output.block1']); to wrap modules you have, use ptl_wrap"
            )
        stages = resolve_stages(backbone, stages)
        if pretrained is None:
            warn_random_init(f"PTLNet({arch!r})")
        else:
            load_backbone_weights(backbone, stages, pretrained)
        set_last_stride(backbone, last_stride)
        body = ptl_wrap(
            backbone,
            stages,
            cell,
            backend=backend,
            kernel_size=kernel_size,
            state_init=state_init,
            input_size=input_size,
        )
        super().__init__(body, num_classes, head, feat_dim)
        self.arch = arch


def torchvision_backbone(arch: str) -> nn.Module:
    """torchvision's `arch`, randomly initialised (weights=None: never downloads)."""
    try:
        return tvm.get_model(arch, weights=None)
    except ValueError as e:
        raise ValueError(f"unknown architecture {arch!r}: not a torchvision model name ({e})") from None


def set_last_stride(model: nn.Module, last_stride: int | None) -> None:
    """Set the stride of a ResNet's layer4 (None: 1, the ReID convention)."""
    if not isinstance(model, tvm.ResNet):
        if last_stride is not None:
            raise ValueError(f"last_stride applies to ResNet backbones only, not {type(model).__name__}")
        return
    set_first_block_stride(model.layer4, 1 if last_stride is None else last_stride)


def set_first_block_stride(layer: nn.Sequential, stride: int) -> None:
    """Set the stride of a ResNet layer (its first block's strided conv and downsample shortcut)."""
    for m in layer[0].modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (stride, stride)
