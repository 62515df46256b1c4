"""ReID training losses: label-smoothed cross-entropy, batch-hard triplet, and their MGN-style sum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against (1 - epsilon) * one_hot + epsilon / num_classes (Szegedy et al.).

    That target is exactly what F.cross_entropy(label_smoothing=epsilon) uses, so this is a thin
    wrapper that also checks the number of classes. logits (B, num_classes), targets (B,) -> scalar.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        return F.cross_entropy(logits, targets, label_smoothing=self.epsilon)


def pairwise_euclidean(x: Tensor) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances, float32 for bf16/fp16 x; clamped before the sqrt so
    its gradient stays finite. Autocast is off inside: its bf16 x @ x.t() loses the small
    differences between large norms (the hardest negative changes), and fp16's overflows."""
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        sq = x.pow(2).sum(dim=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
        return d2.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) over Euclidean distances.

    For each anchor: the farthest sample of its identity (hardest positive, d_ap) and the
    nearest of another identity (hardest negative, d_an); loss = mean(max(0, d_ap - d_an + margin)),
    or mean(softplus(d_ap - d_an)) with soft_margin=True. embeddings (B, D), targets (B,) -> scalar.
    Every anchor needs a negative in the batch (use PKSampler with P >= 2).
    """

    def __init__(self, margin: float = 0.3, soft_margin: bool = False) -> None:
        super().__init__()
        self.margin, self.soft_margin = margin, soft_margin

    def forward(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        if embeddings.dim() != 2 or targets.shape != embeddings.shape[:1]:
            raise ValueError(
                "embeddings must be (B, D) and targets (B,), got "
                f"{tuple(embeddings.shape)} and {tuple(targets.shape)}"
            )
        dist = pairwise_euclidean(embeddings)
        same = targets[:, None] == targets[None, :]
        if same.all():
            raise ValueError("TripletLoss needs at least two identities in the batch")
        d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
        d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
        if self.soft_margin:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()


class ReIDLossParts(NamedTuple):
    total: Tensor
    cross_entropy: Tensor
    triplet: Tensor


class ReIDLoss(nn.Module):
    """MGN-style loss: ce_weight * CE over several logits + triplet_weight * triplet over several embeddings.

    forward(logits: tuple of (B, num_classes), embeddings: tuple of (B, D_i), targets (B,))
    -> ReIDLossParts(total, cross_entropy, triplet); backpropagate `.total`. Each term is
    averaged over its tuple (reduction="mean", as MGN-pytorch does) or summed ("sum"). A bare
    tensor counts as a one-element tuple; a weight of 0 skips that term (its part is 0).
    """

    def __init__(
        self,
        num_classes: int,
        epsilon: float = 0.1,
        margin: float = 0.3,
        soft_margin: bool = False,
        ce_weight: float = 1.0,
        triplet_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.cross_entropy = CrossEntropyLabelSmooth(num_classes, epsilon)
        self.triplet = TripletLoss(margin, soft_margin)
        self.ce_weight, self.triplet_weight, self.reduction = ce_weight, triplet_weight, reduction

    def _term(
        self, fn: nn.Module, inputs: Tensor | Sequence[Tensor], targets: Tensor, weight: float
    ) -> Tensor:
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        if weight == 0 or not inputs:
            return targets.new_zeros((), dtype=torch.float32)
        losses = torch.stack([fn(x, targets) for x in inputs])
        return losses.mean() if self.reduction == "mean" else losses.sum()

    def forward(
        self, logits: Tensor | Sequence[Tensor], embeddings: Tensor | Sequence[Tensor], targets: Tensor
    ) -> ReIDLossParts:
        ce = self._term(self.cross_entropy, logits, targets, self.ce_weight)
        tri = self._term(self.triplet, embeddings, targets, self.triplet_weight)
        return ReIDLossParts(self.ce_weight * ce + self.triplet_weight * tri, ce, tri)
