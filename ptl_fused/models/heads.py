"""What every network returns (ModelOutput) and the two heads of DESIGN.md §1."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from .ptl_wrap import positive_int


class ModelOutput(NamedTuple):
    """Every network's output, in train and eval mode.

    feature: (B, D) the evaluation embedding (ReID retrieval, STD's distillation target).
    logits: every classifier's output, each (B, num_classes); length 1 for single-head nets.
    embeddings: the features the triplet loss uses, each (B, d); (feature,) for single-head nets.
    """

    feature: Tensor
    logits: tuple[Tensor, ...]
    embeddings: tuple[Tensor, ...]


class ReIDHead(nn.Module):
    """The three FC layers of the ReID network: feature map (B, C, h, w) -> ModelOutput.

    global average pool -> FC(C, 2·feat_dim)-BN-ReLU -> FC(2·feat_dim, feat_dim)-BN = feature
    -> FC(feat_dim, num_classes) = logits. The feature is taken after its BN (the retrieval
    embedding of BNNeck-style ReID baselines) and is also the triplet embedding.
    """

    def __init__(self, in_channels: int, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        check_num_classes(num_classes)
        hidden = 2 * feat_dim
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(
            nn.Linear(in_channels, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, feat_dim, bias=False),
            nn.BatchNorm1d(feat_dim),
        )
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, fmap: Tensor) -> ModelOutput:
        if _normalises_the_batch(self.embed, fmap) and fmap.shape[0] == 1:  # BN1d's error names neither
            raise ValueError(
                "ReIDHead: a training batch of 1 image; its BatchNorm1d layers need at least 2 per "
                "batch (drop the last, short batch: DataLoader(drop_last=True), or a PKSampler)"
            )
        feature = self.embed(self.pool(fmap))
        return ModelOutput(feature, (self.classifier(feature),), (feature,))


class ClassificationHead(nn.Module):
    """The two linear layers for image classification: feature map (B, C, h, w) -> ModelOutput.

    global average pool -> Linear(C, feat_dim)-ReLU = feature -> Linear(feat_dim, num_classes).
    """

    def __init__(self, in_channels: int, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(in_channels, feat_dim), nn.ReLU())
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, fmap: Tensor) -> ModelOutput:
        feature = self.embed(self.pool(fmap))
        return ModelOutput(feature, (self.classifier(feature),), (feature,))


def _normalises_the_batch(layers: nn.Module, x: Tensor) -> bool:
    """A BatchNorm1d among `layers` takes the statistics of x's batch (training mode; not while
    FX traces x, whose batch size is no number)."""
    if isinstance(x, torch.fx.Proxy):
        return False
    return any(isinstance(m, nn.BatchNorm1d) and m.training for m in layers.modules())


def check_num_classes(num_classes: int) -> None:
    """num_classes >= 1, given as any integer (a Python int, numpy or 0-dim torch integer)."""
    if positive_int(num_classes) is None:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")


HEADS = {"reid": ReIDHead, "classification": ClassificationHead}
