"""Stage discovery: split a torchvision CNN into the K blocks that PTL pairs its cells with.

A stage is a module mapping x^{i-1} to x^i (DESIGN.md §1). The rules, per family:

- ResNet (also ResNeXt, Wide ResNet): [conv1, bn1, relu, maxpool], layer1, layer2, layer3, layer4.
- DenseNet: [everything before denseblock1] (the stem), then denseblock_n + transition_n, and
  the last dense block + norm5 + ReLU (torchvision's forward applies that ReLU). For
  DenseNet-161 that is DESIGN.md's five blocks.
- MobileNetV2/V3, EfficientNet, ConvNeXt, VGG: ``features`` grouped by resolution: a new stage
  starts at every child that downsamples (holds a conv or pooling layer with stride > 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

FEATURE_FAMILIES = (tvm.MobileNetV2, tvm.MobileNetV3, tvm.EfficientNet, tvm.ConvNeXt, tvm.VGG)


def find_stages(model: nn.Module) -> list[nn.Module]:
    """The stages (x^{i-1} -> x^i) of a torchvision ResNet, DenseNet, MobileNetV2/V3, EfficientNet,
    ConvNeXt or VGG, in order. The returned modules are the model's own (shared, not copied).

    Raises ValueError for other models, naming what to pass to ptl_wrap instead.
    """
    if isinstance(model, tvm.ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    if isinstance(model, tvm.DenseNet):
        return _densenet_stages(model.features)
    if isinstance(model, FEATURE_FAMILIES):
        return _group_by_resolution(model.features)
    raise ValueError(
        f"cannot discover the stages of a {type(model).__name__}: stages='auto' knows torchvision's "
        "ResNet, DenseNet, MobileNetV2/V3, EfficientNet, ConvNeXt and VGG. Pass stages=[...] "
        "instead (to ptl_wrap or PTLNet): the names of the submodules (e.g. ['stem', 'layer1', "
        "'layer2']) or the modules themselves, in order, such that x^i = stages[i-1](x^(i-1)) and "
        "x^0 is the image"
    )


def _densenet_stages(features: nn.Sequential) -> list[nn.Module]:
    children = dict(features.named_children())
    names = list(children)
    blocks = [n for n in names if n.startswith("denseblock")]
    stem = [children[n] for n in names[: names.index(blocks[0])]]
    stages: list[nn.Module] = [nn.Sequential(*stem)]
    for i, block in enumerate(blocks, start=1):
        transition = f"transition{i}"
        if transition in children:
            stages.append(nn.Sequential(children[block], children[transition]))
        else:  # the last block: its norm (norm5) and the ReLU of torchvision's DenseNet.forward
            tail = [children[n] for n in names[names.index(block) + 1 :]]
            stages.append(nn.Sequential(children[block], *tail, nn.ReLU()))
    return stages


def _downsamples(module: nn.Module) -> bool:
    pools = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    return any(
        max(torch.nn.modules.utils._pair(m.stride)) > 1 for m in module.modules() if isinstance(m, pools)
    )


def _group_by_resolution(features: nn.Sequential) -> list[nn.Module]:
    groups: list[list[nn.Module]] = []
    for child in features:
        if not groups or _downsamples(child):
            groups.append([])
        groups[-1].append(child)
    return [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]
