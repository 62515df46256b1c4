"""Training losses over the models' ModelOutput(feature (B, D), logits (tuple of (B, N)),
embeddings (tuple of (B, E))). A criterion is called as criterion(output, labels, images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClassificationLoss(nn.Module):
    """Cross-entropy averaged over the model's classifiers (one for PTLNet, several for MGN)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out, labels: Tensor, images: Tensor | None = None) -> Tensor:
        losses = [
            F.cross_entropy(z.float(), labels, label_smoothing=self.label_smoothing) for z in out.logits
        ]
        return torch.stack(losses).mean()


class DistillationLoss(nn.Module):
    """STD (paper §IV): (1 - lam) * base(student) + lam * L1(student feature, teacher feature).

    L1 is the mean absolute difference over the batch and the feature (nn.L1Loss's default), so
    lam weighs it the same whatever the feature width (a sum over a 2048-wide feature would not).

    The teacher is a frozen PTL network in eval mode: it carries no state and gets no gradient.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, lam: float = 0.8) -> None:
        super().__init__()
        self.base, self.lam = base, lam
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule of the loss

    def forward(self, out, labels: Tensor, images: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.teacher[0](images).feature.float()
        l1 = F.l1_loss(out.feature.float(), target)
        return (1.0 - self.lam) * self.base(out, labels, images) + self.lam * l1
