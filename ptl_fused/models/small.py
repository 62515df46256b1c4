"""Small-image networks: DenseNet-BC-100 for CIFAR (32x32) and a tiny CNN for 8x8 digits."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torchvision.models import DenseNet

from .ptl_net import PTLModel
from .ptl_wrap import ptl_wrap


def densenet_bc_100(
    num_classes: int,
    cell: Literal["v1", "v2"] | None = "v1",
    backend: str = "auto",
    feat_dim: int = 256,
    kernel_size: int = 3,
    state_init: str = "zeros",
) -> PTLModel:
    """DenseNet-BC (depth 100, growth 12: 3 blocks of 16 bottleneck layers, compression 0.5,
    24 initial features) for 32x32 images, with PTL cells and the classification head.

    torchvision's DenseNet builds the blocks; the CIFAR stem is one 3x3 conv (no BN, ReLU or
    pooling: the dense layers are pre-activated), as in Huang et al.'s CIFAR models. Stages:
    conv0 (32x32), block1+transition1 (16x16), block2+transition2 (8x8), block3+norm5+ReLU (8x8).
    image (B, 3, 32, 32) -> ModelOutput with feature (B, feat_dim).
    """
    net = DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, bn_size=4)
    net.features.conv0 = nn.Conv2d(3, 24, kernel_size=3, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        delattr(net.features, name)
    body = ptl_wrap(
        net,
        "auto",
        cell,
        backend=backend,
        kernel_size=kernel_size,
        state_init=state_init,
        input_size=(32, 32),
    )
    return PTLModel(body, num_classes, "classification", feat_dim)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def digits_net(
    num_classes: int = 10,
    cell: Literal["v1", "v2"] | None = "v1",
    backend: str = "auto",
    feat_dim: int = 64,
    kernel_size: int = 3,
    state_init: str = "zeros",
) -> PTLModel:
    """A tiny CNN for 8x8 single-channel images (scikit-learn digits): stem 1->16 (8x8), stage
    16->32 (8x8), stage 32->64 (stride 2, 4x4), with PTL cells and the classification head.
    image (B, 1, 8, 8) -> ModelOutput with feature (B, feat_dim).
    """
    net = nn.Sequential(_conv_bn_relu(1, 16), _conv_bn_relu(16, 32), _conv_bn_relu(32, 64, stride=2))
    body = ptl_wrap(
        net,
        list(net),
        cell,
        backend=backend,
        kernel_size=kernel_size,
        state_init=state_init,
        input_size=(8, 8),
        in_channels=1,
    )
    return PTLModel(body, num_classes, "classification", feat_dim)
