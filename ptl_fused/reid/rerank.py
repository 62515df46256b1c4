"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li; "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), on distance matrices.

Written from the paper, following the conventions of the widely used reference implementation
(zhunzhong07/person-re-ranking as adapted in torchreid's rerank.py), so that results agree:
- the query and gallery are pooled into one set of N = num_q + num_g points; the input distances
  are squared and each column divided by its maximum, and the matrix is transposed (for a
  symmetric input: every row divided by its maximum);
- N(p, k) is the k + 1 nearest points of p, p itself included (a stable sort breaks ties), all N
  points when N <= k;
  R(p, k) = {g in N(p, k) : p in N(g, k)};
- R*(p) = R(p, k1) united with every R(q, round(k1 / 2)), q in R(p, k1), that shares more than
  2/3 of its members with R(p, k1);
- V_p = exp(-d(p, g)) over g in R*(p), normalised to sum 1; local query expansion (k2 > 1)
  replaces V_p by the mean of V_g over the min(k2, N) nearest points g (p included);
- Jaccard distance d_J(p, g) = 1 - sum min(V_p, V_g) / sum max(V_p, V_g), where
  sum max = 2 - sum min because each V sums to 1;
- final = (1 - lambda) * d_J + lambda * (normalised squared distance), for the query rows and
  gallery columns.
Memory: one float32 (N, N) copy of the pooled distances (built already transposed, so there is no
second copy) dominates: 4 N^2 bytes, 1.5 GB for Market-1501's N = 19,281 (3,368 query + 15,913
gallery images, junk dropped), 35 GB for MSMT17's 93,820. Besides it: the float32 (num_q, num_g)
result, int64 argsort chunks of 256 rows (2 KB x N), an int64 (N, k1 + 1, k1 + 1) reciprocity test
and the sparse V (float64, about N * |R*| * k2 entries, kept twice: CSR and CSC). Inputs that are
not float32 (numpy float64, say) are first copied to float32, adding 4 (Q^2 + QG + G^2) bytes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .._validate import check_int


def _as_array(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy()  # numpy has no bfloat16
    return np.asarray(a, dtype=np.float32)


def _k_reciprocal(nearest: np.ndarray) -> list[np.ndarray]:
    """nearest (N, k+1) neighbour indices -> for each p, R(p, k) in nearest-first order."""
    points = np.arange(len(nearest))
    back = nearest[nearest]  # (N, k+1, k+1): the neighbours of each neighbour
    mutual = (back == points[:, None, None]).any(axis=2)
    return [row[m] for row, m in zip(nearest, mutual, strict=True)]


def _sorted_neighbours(dist: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """The first k columns of a stable row-wise argsort, computed in row chunks to bound memory."""
    k = min(k, dist.shape[1])
    # .copy(): a [:, :k] view would keep each whole int64 (chunk, N) argsort alive until the end.
    return np.concatenate(
        [
            np.argsort(dist[s : s + chunk], axis=1, kind="stable")[:, :k].copy()
            for s in range(0, len(dist), chunk)
        ]
    )


def re_rank(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Re-ranked (num_q, num_g) float32 distances from the q-g, q-q and g-g distance matrices.

    Inputs are numpy arrays or tensors (e.g. from compute_distance); k1, k2, lambda_value as in
    the paper (20, 6, 0.3). lambda_value=1 returns the normalised squared input distances.
    """
    q_g, q_q, g_g = (_as_array(a) for a in (q_g_dist, q_q_dist, g_g_dist))
    num_q, num_g = q_g.shape if q_g.ndim == 2 else (-1, -1)
    if q_g.ndim != 2 or q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise ValueError(
            f"expected q_g_dist (Q, G), q_q_dist (Q, Q), g_g_dist (G, G); got "
            f"{q_g.shape}, {q_q.shape}, {g_g.shape}"
        )
    if num_q == 0 or num_g == 0:
        raise ValueError(f"re_rank needs at least one query and one gallery image, got {num_q} x {num_g}")
    check_int("k1", k1, 1)
    check_int("k2", k2, 1)
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    # The reference squares the pooled matrix [[q_q, q_g], [q_g^T, g_g]], divides each column by its
    # maximum and transposes. Building the transpose directly and dividing its rows gives the same
    # float32 values with a single (N, N) copy, the memory peak; the rest is done in place.
    dist = np.block([[q_q.T, q_g], [q_g.T, g_g.T]])
    np.square(dist, out=dist)
    row_max = dist.max(axis=1, keepdims=True)  # NaN or inf wherever a row holds one
    if not np.isfinite(row_max).all():
        raise ValueError("re_rank: the distances hold NaN or inf (features that are not finite?)")
    if (row_max == 0).any():  # the normalisation would divide by 0: every output NaN
        p = int(np.flatnonzero(row_max == 0)[0])
        which = f"query {p}" if p < num_q else f"gallery {p - num_q}"
        raise ValueError(f"re_rank: all distances of {which} are 0 (identical features?): nothing to rank by")
    dist /= row_max
    n = len(dist)
    # Fewer than k1 + 1 (or k2) points: every neighbour list is the whole set, as the reference's
    # slices [:k1 + 1] and [:k2] cap at N; the query expansion then averages over all N points.
    k2 = min(k2, n)
    half = int(np.around(k1 / 2))
    nearest = _sorted_neighbours(dist, max(k1 + 1, k2))
    recip = _k_reciprocal(nearest[:, : k1 + 1])
    recip_half = _k_reciprocal(nearest[:, : half + 1])

    rows, cols, vals = [], [], []
    for p in range(n):
        members = set(recip[p].tolist())
        expanded = set(members)
        for q in recip[p]:
            candidate = recip_half[q]
            if len(members.intersection(candidate.tolist())) > 2 / 3 * len(candidate):
                expanded.update(candidate.tolist())
        idx = np.fromiter(sorted(expanded), dtype=np.int64)
        weight = np.exp(-dist[p, idx])
        rows.append(np.full(len(idx), p))
        cols.append(idx)
        vals.append(weight / weight.sum())
    v = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    if k2 > 1:  # local query expansion: average over the k2 nearest points
        expand = sp.csr_matrix(
            (np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), nearest[:, :k2].ravel())), shape=(n, n)
        )
        v = expand @ v
    v_cols = v.tocsc()
    final = np.empty((num_q, num_g), dtype=np.float32)
    for p in range(num_q):
        start, end = v.indptr[p], v.indptr[p + 1]
        shared = v_cols[:, v.indices[start:end]].tocoo()  # the points that share a member with p
        overlap = np.minimum(shared.data, v.data[start:end][shared.col])
        s = np.bincount(shared.row, weights=overlap, minlength=n)[num_q:]
        # One row at a time in float64, as the reference computes the whole matrix; only the float32
        # (num_q, num_g) result is kept (no float64 (num_q, N) Jaccard or final matrices).
        final[p] = (1 - lambda_value) * (1 - s / (2 - s)) + lambda_value * dist[p, num_q:]
    return final
