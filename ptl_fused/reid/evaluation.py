"""Person re-identification evaluation: CMC and mAP under the Market-1501 or CUHK03 protocol.

For each query, the gallery is ranked by distance (ties keep gallery order: a stable sort);
gallery images of the query's identity taken by the query's camera, and junk images
(identity -1), are removed; a query with no remaining true match is skipped and counted.
AP is the non-interpolated average precision over the remaining ranking, mAP its mean over
valid queries.

protocol="market": CMC[k] is the fraction of valid queries with a true match within the first
k+1 ranks.
protocol="cuhk03" (single-gallery-shot, torchreid's eval_cuhk03): for each query, one image per
gallery identity is drawn at random among the remaining ones, CMC is taken on that reduced
ranking, and this is repeated num_repeats times and averaged; AP stays that of the full ranking.
The draws of query q depend only on (seed, q), not on chunking or device.

Queries are processed in chunks, so memory stays bounded for large galleries (MSMT17), with the
same result as one pass; `evaluate_features` also computes the distances chunk by chunk, so the
full (num_query, num_gallery) matrix is never built.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from numpy.typing import ArrayLike

from .._validate import check_int, few
from .features import compute_distance

# A matrix or vector given as a numpy array, a tensor (on any device) or a sequence.
Array = ArrayLike | torch.Tensor

JUNK_PID = -1
PROTOCOLS = ("market", "cuhk03")


def _as_tensor(a, name: str, dims: int) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


class _RankAccumulator:
    """Sums of CMC and AP over chunks of queries against one gallery."""

    def __init__(self, g_pids, g_camids, max_rank: int, protocol: str, num_repeats: int, seed: int, device):
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol == "cuhk03" and num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.g_pids, self.g_camids = g_pids.to(device), g_camids.to(device)
        # Gallery identities as 0..U-1 codes, for the cuhk03 protocol's one-image-per-identity draw.
        self.g_codes = torch.unique(self.g_pids, return_inverse=True)[1]
        self.num_codes = int(self.g_codes.max()) + 1 if len(self.g_codes) else 0
        self.max_rank, self.protocol, self.num_repeats, self.seed = max_rank, protocol, num_repeats, seed
        self.ranks = torch.arange(1, max_rank + 1, device=device)
        # Counts of queries (times repeats, for cuhk03) with a match within each rank: integers, so
        # the sum is exact and does not depend on the chunking.
        self.cmc_sum = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap_sum, self.valid, self.seen = 0.0, 0, 0

    def add(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, first_query: int) -> None:
        """dist (R, num_g) for queries first_query .. first_query + R - 1."""
        device = dist.device
        num_g = dist.shape[1]
        nan_rows = torch.isnan(dist).any(dim=1)
        if nan_rows.any():  # NaN sorts last: a diverged model would still get a plausible mAP
            bad = (first_query + torch.nonzero(nan_rows).flatten().cpu()).tolist()
            raise ValueError(f"NaN distances for query rows {few(bad)}: the features are not finite")
        # A row of infinities is all ties, ranked in gallery order: a made-up result, like NaN's.
        blind_rows = ~torch.isfinite(dist).any(dim=1) if num_g else nan_rows
        if blind_rows.any():
            bad = (first_query + torch.nonzero(blind_rows).flatten().cpu()).tolist()
            raise ValueError(f"query rows {few(bad)} have no finite distance to any gallery image")
        self.seen += dist.shape[0]
        order = torch.argsort(dist, dim=1, stable=True)
        pids, cams = self.g_pids[order], self.g_camids[order]
        q_pid, q_cam = q_pids.to(device)[:, None], q_camids.to(device)[:, None]
        keep = ~((pids == q_pid) & (cams == q_cam)) & (pids != JUNK_PID)
        match = (pids == q_pid) & keep
        n_rel = match.sum(dim=1)
        ok = n_rel > 0
        if not ok.any():
            return
        query_ids = first_query + torch.nonzero(ok).flatten().cpu()
        order, keep, match, n_rel = order[ok], keep[ok], match[ok], n_rel[ok]
        # Rank of each kept gallery item among the kept ones (1-based); removed items get 0.
        rank = torch.cumsum(keep, dim=1) * keep
        hits = torch.cumsum(match, dim=1)
        # AP = mean over true matches of (matches up to it) / (its rank); in float64, so that
        # the chunking changes mAP only in its last bits.
        precision = torch.where(match, hits.double() / rank.clamp_min(1), 0.0)
        self.ap_sum += (precision.sum(dim=1) / n_rel).sum().item()
        self.valid += len(n_rel)
        if self.protocol == "market":
            self.cmc_sum += self._cmc_counts(match, rank, num_g)
            return
        codes = self.g_codes[order]
        rngs = [np.random.default_rng([self.seed, int(q)]) for q in query_ids]
        for _ in range(self.num_repeats):
            # A random permutation of the gallery per query: among the kept images of each
            # identity, the one with the largest key is that identity's single gallery image.
            keys = torch.from_numpy(np.stack([rng.permutation(num_g) for rng in rngs])).to(device)
            keys = torch.where(keep, keys.gather(1, order), -1)
            best = torch.full((len(keys), self.num_codes), -1, dtype=keys.dtype, device=device)
            best.scatter_reduce_(1, codes, keys, reduce="amax")
            chosen = keep & (keys == best.gather(1, codes))
            self.cmc_sum += self._cmc_counts(match & chosen, torch.cumsum(chosen, dim=1), num_g)

    def _cmc_counts(self, match: torch.Tensor, rank: torch.Tensor, num_g: int) -> torch.Tensor:
        """Number of queries whose first true match is within each of the ranks 1..max_rank."""
        first = torch.where(match, rank, torch.full_like(rank, num_g + 1)).min(dim=1).values
        return (first[:, None] <= self.ranks[None, :]).sum(dim=0).double()

    def result(self) -> tuple[np.ndarray, float]:
        skipped = self.seen - self.valid
        if skipped:
            warnings.warn(
                f"{skipped} of {self.seen} queries have no true match in the gallery and were skipped",
                stacklevel=3,
            )
        if self.valid == 0:
            raise ValueError("no query has a true match in the gallery: CMC and mAP are undefined")
        repeats = self.num_repeats if self.protocol == "cuhk03" else 1
        return (self.cmc_sum / (self.valid * repeats)).cpu().numpy(), self.ap_sum / self.valid


def _as_ids(a, name: str) -> torch.Tensor:
    # Integer ids as int64: in uint8 the junk id -1 would read as 255, a real identity.
    t = _as_tensor(a, name, 1)
    return t if t.is_floating_point() else t.long()


def _check_ids(num_q: int, num_g: int, q_pids, g_pids, q_camids, g_camids, what: str):
    q_pids, g_pids = _as_ids(q_pids, "q_pids"), _as_ids(g_pids, "g_pids")
    q_camids, g_camids = _as_ids(q_camids, "q_camids"), _as_ids(g_camids, "g_camids")
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(
            f"{what} has {num_q} query rows but q_pids/q_camids have {len(q_pids)}/{len(q_camids)}"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"{what} has {num_g} gallery columns but g_pids/g_camids have {len(g_pids)}/{len(g_camids)}"
        )
    return q_pids, g_pids, q_camids, g_camids


def evaluate(
    distmat: Array,
    q_pids: Array,
    g_pids: Array,
    q_camids: Array,
    g_camids: Array,
    max_rank: int = 50,
    chunk: int = 1024,
    *,
    protocol: str = "market",
    num_repeats: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """CMC (np.ndarray of length max_rank) and mAP of a (num_query, num_gallery) distance matrix.

    distmat: numpy array or tensor (num_q, num_g), smaller = more similar (on GPU if given so);
    q_pids/q_camids: (num_q,); g_pids/g_camids: (num_g,). protocol "market" or "cuhk03"
    (num_repeats random single-shot galleries, seeded by `seed`; see the module docstring).
    """
    check_int("max_rank", max_rank, 1)
    check_int("chunk", chunk, 1)
    dist = _as_tensor(distmat, "distmat", 2)
    num_q, num_g = dist.shape
    q_pids, g_pids, q_camids, g_camids = _check_ids(
        num_q, num_g, q_pids, g_pids, q_camids, g_camids, "distmat"
    )
    acc = _RankAccumulator(g_pids, g_camids, max_rank, protocol, num_repeats, seed, dist.device)
    for start in range(0, num_q, chunk):
        rows = slice(start, min(start + chunk, num_q))
        acc.add(dist[rows], q_pids[rows], q_camids[rows], start)
    return acc.result()


def evaluate_features(
    qf: Array,
    gf: Array,
    q_pids: Array,
    g_pids: Array,
    q_camids: Array,
    g_camids: Array,
    metric: str = "euclidean",
    max_rank: int = 50,
    chunk: int = 1024,
    device: torch.device | str | None = None,
    *,
    protocol: str = "market",
    num_repeats: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """evaluate(compute_distance(qf, gf, metric), ...) without the full distance matrix.

    qf (num_q, D), gf (num_g, D): features (e.g. from extract_features). Distances and rankings
    are computed `chunk` queries at a time on `device` (default: qf's device), so memory is
    O(chunk * num_g). Same CMC and mAP as building the full matrix (exactly, when the distance
    arithmetic is exact; otherwise up to float rounding of near-ties).
    """
    check_int("max_rank", max_rank, 1)
    check_int("chunk", chunk, 1)
    qf, gf = _as_tensor(qf, "qf", 2), _as_tensor(gf, "gf", 2)
    device = torch.device(device) if device is not None else qf.device
    qf, gf = qf.to(device), gf.to(device)
    num_q, num_g = len(qf), len(gf)
    q_pids, g_pids, q_camids, g_camids = _check_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids, "qf/gf")
    acc = _RankAccumulator(g_pids, g_camids, max_rank, protocol, num_repeats, seed, device)
    for start in range(0, num_q, chunk):
        rows = slice(start, min(start + chunk, num_q))
        acc.add(compute_distance(qf[rows], gf, metric, chunk=chunk), q_pids[rows], q_camids[rows], start)
    return acc.result()
