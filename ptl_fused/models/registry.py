"""build_model: one name -> network registry for every model of the project."""

from __future__ import annotations

from typing import Any

from torch import nn

from .mgn import MGN
from .ptl_net import PTLNet
from .small import densenet_bc_100, digits_net

SMALL_NETS = {"densenet100": densenet_bc_100, "digits": digits_net}


def build_model(
    arch: str,
    num_classes: int,
    *,
    cell: str | None = "v1",
    head: str | None = None,
    backend: str = "auto",
    pretrained: str | None = None,
    **kw: Any,
) -> nn.Module:
    """The network `arch` returning ModelOutput: "mgn" (MGN / MGN-PTL), "densenet100"
    (DenseNet-BC-100, CIFAR), "digits" (8x8 digits), or any torchvision CNN ptl_wrap can split
    ("resnet50", "densenet161", "mobilenet_v3_large", ...) as a PTLNet. cell: "v1", "v2" or
    None (the plain baseline). head: "reid" or "classification" (default: reid for PTLNet;
    MGN is ReID-only, the small nets classification-only). kw: the builder's other arguments.
    """
    if arch == "mgn" or arch in SMALL_NETS:
        fixed = "reid" if arch == "mgn" else "classification"
        if head not in (None, fixed):
            raise ValueError(f"{arch!r} has only the {fixed!r} head, got head={head!r}")
        if arch == "mgn":
            return MGN(num_classes, cell, backend=backend, pretrained=pretrained, **kw)
        if pretrained is not None:
            raise ValueError(f"{arch!r} is trained from scratch: there are no pretrained weights to load")
        return SMALL_NETS[arch](num_classes, cell, backend=backend, **kw)
    return PTLNet(arch, num_classes, cell, head or "reid", backend=backend, pretrained=pretrained, **kw)
