"""Person re-identification evaluation: the Market-1501 protocol (CMC and mAP).

For each query, the gallery is ranked by distance (ties keep gallery order: a stable sort);
gallery images of the query's identity taken by the query's camera, and junk images
(identity -1), are removed; a query with no remaining true match is skipped and counted.
CMC[k] is the fraction of valid queries with a true match within the first k+1 ranks; AP is
the non-interpolated average precision, mAP its mean over valid queries. Queries are
processed in chunks, so memory stays bounded for large galleries (MSMT17), with the same
result as one pass.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

JUNK_PID = -1


def _as_tensor(a, name: str, dims: int) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def evaluate(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank: int = 50,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, float]:
    """CMC (np.ndarray of length max_rank) and mAP of a (num_query, num_gallery) distance matrix.

    distmat: numpy array or tensor (num_q, num_g), smaller = more similar (on GPU if given so);
    q_pids/q_camids: (num_q,); g_pids/g_camids: (num_g,).
    """
    dist = _as_tensor(distmat, "distmat", 2)
    q_pids, g_pids = _as_tensor(q_pids, "q_pids", 1), _as_tensor(g_pids, "g_pids", 1)
    q_camids, g_camids = _as_tensor(q_camids, "q_camids", 1), _as_tensor(g_camids, "g_camids", 1)
    num_q, num_g = dist.shape
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(
            f"distmat has {num_q} query rows but q_pids/q_camids have {len(q_pids)}/{len(q_camids)}"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"distmat has {num_g} gallery columns but g_pids/g_camids have {len(g_pids)}/{len(g_camids)}"
        )
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    device = dist.device
    g_pids, g_camids = g_pids.to(device), g_camids.to(device)
    q_pids, q_camids = q_pids.to(device), q_camids.to(device)

    cmc_sum = torch.zeros(max_rank, dtype=torch.float64, device=device)
    ap_sum, valid = 0.0, 0
    for start in range(0, num_q, chunk_size):
        rows = slice(start, min(start + chunk_size, num_q))
        order = torch.argsort(dist[rows], dim=1, stable=True)
        pids, cams = g_pids[order], g_camids[order]
        q_pid, q_cam = q_pids[rows, None], q_camids[rows, None]
        keep = ~((pids == q_pid) & (cams == q_cam)) & (pids != JUNK_PID)
        match = (pids == q_pid) & keep
        # Rank of each kept gallery item among the kept ones (1-based); removed items get 0.
        rank = torch.cumsum(keep, dim=1) * keep
        n_rel = match.sum(dim=1)
        ok = n_rel > 0
        if not ok.any():
            continue
        match, rank, n_rel = match[ok], rank[ok], n_rel[ok]
        hits = torch.cumsum(match, dim=1)
        # AP = mean over true matches of (matches up to it) / (its rank).
        precision = torch.where(match, hits / rank.clamp_min(1), torch.zeros((), device=device))
        ap_sum += (precision.sum(dim=1) / n_rel).sum().item()
        # First true-match rank (1-based) -> CMC counts.
        first = torch.where(match, rank, torch.full_like(rank, num_g + 1)).min(dim=1).values
        ranks = torch.arange(1, max_rank + 1, device=device)
        cmc_sum += (first[:, None] <= ranks[None, :]).sum(dim=0).double()
        valid += int(ok.sum())
    skipped = num_q - valid
    if skipped:
        warnings.warn(
            f"{skipped} of {num_q} queries have no true match in the gallery and were skipped", stacklevel=2
        )
    if valid == 0:
        raise ValueError("no query has a true match in the gallery: CMC and mAP are undefined")
    return (cmc_sum / valid).cpu().numpy(), ap_sum / valid
