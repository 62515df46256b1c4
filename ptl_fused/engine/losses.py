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

    def __init__(
        self, base: nn.Module, teacher: nn.Module, lam: float = 0.8, name: str = "the teacher"
    ) -> None:
        super().__init__()
        self.base, self.lam, self.name = base, lam, name
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule of the loss
        self._ran = False

    def forward(self, out, labels: Tensor, images: Tensor) -> Tensor:
        with torch.no_grad():
            try:
                target = self.teacher[0](images).feature.float()
            except (RuntimeError, ValueError) as e:
                # A teacher trained on other images (channels, size) fails deep inside its first
                # layer; say that it is the teacher. Later failures (OOM, ...) are not about that.
                if self._ran or isinstance(e, torch.OutOfMemoryError):
                    raise
                raise ValueError(
                    f"STD: {self.name} cannot take the student's images of shape {tuple(images.shape)} "
                    f"(was it trained on other data?): {e}"
                ) from e
        self._ran = True
        student = out.feature.float()
        if student.shape != target.shape:  # l1_loss would broadcast, or only warn
            raise ValueError(
                f"STD: the student's feature has shape {tuple(student.shape)}, {self.name}'s "
                f"{tuple(target.shape)}; they must match"
            )
        l1 = F.l1_loss(student, target)
        return (1.0 - self.lam) * self.base(out, labels, images) + self.lam * l1
