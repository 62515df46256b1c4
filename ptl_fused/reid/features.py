"""Feature extraction for retrieval and query-gallery distances."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


def _feature(output) -> Tensor:
    """The retrieval feature of a model output: a tensor, or an object with `.feature` (ModelOutput)."""
    feature = getattr(output, "feature", output)
    if not isinstance(feature, Tensor):
        raise TypeError(
            f"the model must return a tensor or an object with .feature, got {type(output).__name__}"
        )
    return feature.flatten(1)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    flip: bool = True,
    normalize: bool = True,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Features of every image of `loader` (batches (images, pids, camids, ...), e.g. ImageDataset).

    The model runs in eval mode (BConv-Cells then start each batch from zero state, so features
    do not depend on batching) under torch.no_grad; its training mode is restored afterwards.
    flip=True averages the features of each image and its horizontal mirror; normalize=True
    then L2-normalises. Returns (feats (N, D) float32 on the CPU, pids (N,), camids (N,)).
    A NaN or inf feature is a ValueError naming the batch's images.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    try:
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            f = _feature(model(images)).float()
            if flip:
                f = (f + _feature(model(images.flip(3))).float()) / 2
            if not torch.isfinite(f).all():  # e.g. a run that diverged in fp16
                raise ValueError(
                    f"the model gave non-finite features (NaN or inf) for images "
                    f"{sum(map(len, feats))}..{sum(map(len, feats)) + len(f) - 1} of the loader"
                )
            if normalize:
                f = F.normalize(f, dim=1)
            feats.append(f.cpu())
            pids.append(torch.as_tensor(batch[1]))
            camids.append(torch.as_tensor(batch[2]))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()


def compute_distance(qf: Tensor, gf: Tensor, metric: str = "euclidean", chunk: int = 4096) -> Tensor:
    """(Nq, D) x (Ng, D) -> (Nq, Ng) float32 distances, computed `chunk` query rows at a time.

    metric="euclidean": the squared Euclidean distance ||q||^2 + ||g||^2 - 2 q.g, as torchreid
    and most ReID code compute it (same ranking as the Euclidean distance), clamped at 0 against
    rounding. metric="cosine": 1 - cosine similarity. Runs on the device of qf.
    """
    qf, gf = torch.as_tensor(qf).float(), torch.as_tensor(gf).float()
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"qf and gf must be (Nq, D) and (Ng, D), got {tuple(qf.shape)} and {tuple(gf.shape)}"
        )
    gf = gf.to(qf.device)
    if metric == "cosine":
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    out = []
    with torch.autocast(qf.device.type, enabled=False):  # float32 also when called under autocast
        g_sq = gf.pow(2).sum(dim=1)
        for start in range(0, len(qf), chunk):
            q = qf[start : start + chunk]
            if metric == "cosine":
                out.append(1.0 - q @ gf.t())
            else:
                out.append(
                    (q.pow(2).sum(dim=1, keepdim=True) + g_sq[None, :] - 2.0 * q @ gf.t()).clamp_min(0)
                )
    return torch.cat(out)
