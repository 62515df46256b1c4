"""k-reciprocal re-ranking: a hand-worked case, properties, and a slow set-based implementation."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from ptl_fused.reid import re_rank


def _line_dists(q, g):
    """Euclidean distance matrices of 1-D points."""
    q, g = np.asarray(q, float)[:, None], np.asarray(g, float)[:, None]
    return np.abs(q - g.T), np.abs(q - q.T), np.abs(g - g.T)


def _slow_re_rank(q_g, q_q, g_g, k1, k2, lam):
    """The paper's definitions with Python sets and loops (and the reference's normalisation)."""
    nq = len(q_g)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    n = len(full)
    # Column j divided by its max, then transposed: d[i][j] = full[j][i] / max_a full[a][i].
    d = [[full[j][i] / max(full[a][i] for a in range(n)) for j in range(n)] for i in range(n)]
    order = [sorted(range(n), key=lambda j, i=i: (d[i][j], j)) for i in range(n)]

    def neighbours(p, k):  # N(p, k): the k + 1 nearest, p included
        return set(order[p][: k + 1])

    def reciprocal(p, k):  # R(p, k)
        return {g for g in neighbours(p, k) if p in neighbours(g, k)}

    half = round(k1 / 2)
    v = []
    for p in range(n):
        r = reciprocal(p, k1)
        r_star = set(r)
        for q in r:
            rq = reciprocal(q, half)
            if len(rq & r) > 2 / 3 * len(rq):
                r_star |= rq
        z = sum(math.exp(-d[p][g]) for g in r_star)
        v.append([math.exp(-d[p][g]) / z if g in r_star else 0.0 for g in range(n)])
    if k2 > 1:  # the mean over the k2 nearest (all n points if n < k2)
        v = [[np.mean([v[g][c] for g in order[p][:k2]]) for c in range(n)] for p in range(n)]
    out = np.zeros((nq, n - nq))
    for p in range(nq):
        for j in range(nq, n):
            s_min = sum(min(a, b) for a, b in zip(v[p], v[j], strict=True))
            s_max = sum(max(a, b) for a, b in zip(v[p], v[j], strict=True))
            out[p, j - nq] = (1 - lam) * (1 - s_min / s_max) + lam * d[p][j]
    return out


def test_hand_worked_three_points():
    # Query q=0, gallery g1=1, g2=3 on a line. Squared distances q-g1 1, q-g2 9, g1-g2 4;
    # row-normalised (the pooled matrix is symmetric): q [0, 1/9, 1], g1 [1/4, 0, 1], g2 [1, 4/9, 0].
    # k1=1: N(p,1) = {p, nearest}: q {q,g1}, g1 {g1,q}, g2 {g2,g1} -> R(q) = R(g1) = {q,g1}, R(g2) = {g2};
    # round(1/2) = 0, so the expansion adds nothing. V_q = (1, e^-1/9) / (1 + e^-1/9) on (q, g1),
    # V_g1 = (e^-1/4, 1) / (1 + e^-1/4) on (q, g1), V_g2 = 1 on g2. k2=1: no query expansion.
    a, b = math.exp(-1 / 9), math.exp(-1 / 4)
    vq, vg1 = (1 / (1 + a), a / (1 + a)), (b / (1 + b), 1 / (1 + b))
    s = min(vq[0], vg1[0]) + min(vq[1], vg1[1])
    jac_g1 = 1 - s / (2 - s)
    want = [0.7 * jac_g1 + 0.3 / 9, 0.7 * 1.0 + 0.3 * 1.0]  # g2 shares nothing with q: Jaccard 1
    got = re_rank(*_line_dists([0.0], [1.0, 3.0]), k1=1, k2=1, lambda_value=0.3)
    assert got.dtype == np.float32 and got.shape == (1, 2)
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def _clusters(seed, nq, ng, dim=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim)) * 2
    q = centres[rng.integers(0, 4, nq)] + rng.normal(size=(nq, dim))
    g = centres[rng.integers(0, 4, ng)] + rng.normal(size=(ng, dim))

    def d(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    return d(q, g), d(q, q), d(g, g)


# k1 = 6, 7 with these seeds: the round(k1/2)-reciprocal expansion adds points (checked by mutation).
@pytest.mark.parametrize(
    ("seed", "k1", "k2", "lam"),
    [(0, 20, 6, 0.3), (1, 4, 3, 0.5), (0, 6, 1, 0.0), (1, 7, 3, 0.3), (2, 3, 2, 0.2)],
)
def test_matches_slow_implementation(seed, k1, k2, lam):
    dists = _clusters(seed, nq=5, ng=14)
    got = re_rank(*dists, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(got, _slow_re_rank(*dists, k1, k2, lam), atol=2e-6)


def test_bfloat16_distances_are_read_as_float32():
    dists = [torch.as_tensor(d, dtype=torch.bfloat16) for d in _clusters(0, nq=3, ng=6)]
    want = re_rank(*(d.float() for d in dists), k1=4, k2=2)
    np.testing.assert_array_equal(re_rank(*dists, k1=4, k2=2), want)


# Fewer points (query + gallery) than k1 + 1 and k2, the paper's defaults included.
@pytest.mark.parametrize(
    ("nq", "ng", "k1", "k2"), [(2, 3, 20, 6), (1, 2, 20, 6), (2, 2, 3, 5), (3, 4, 20, 2)]
)
def test_fewer_points_than_k1_or_k2_match_slow_implementation(nq, ng, k1, k2):
    dists = _clusters(4, nq=nq, ng=ng)
    got = re_rank(*dists, k1=k1, k2=k2)
    assert got.shape == (nq, ng)
    np.testing.assert_allclose(got, _slow_re_rank(*dists, k1, k2, 0.3), atol=2e-6)


def test_lambda_one_is_normalised_distance_and_tensors_accepted():
    q_g, q_q, g_g = _clusters(0, nq=4, ng=9)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    want = (full / full.max(axis=0)).T[:4, 4:]
    got = re_rank(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g), lambda_value=1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_jaccard_part_in_unit_interval_and_shape():
    got = re_rank(*_clusters(1, nq=6, ng=11), k1=4, k2=2, lambda_value=0.0)
    assert got.shape == (6, 11)
    assert (got >= -1e-6).all() and (got <= 1 + 1e-6).all()


def test_shape_errors():
    q_g, q_q, g_g = _clusters(2, nq=3, ng=5)
    with pytest.raises(ValueError, match=r"expected q_g_dist \(Q, G\), q_q_dist \(Q, Q\), g_g_dist \(G, G\)"):
        re_rank(q_g, q_q, g_g[:4, :4])
    with pytest.raises(ValueError, match="k1 must be an int >= 1, got 0"):
        re_rank(q_g, q_q, g_g, k1=0)
    with pytest.raises(ValueError, match="k2 must be an int >= 1, got 2.5"):
        re_rank(q_g, q_q, g_g, k2=2.5)
    with pytest.raises(ValueError, match=r"lambda_value must be in \[0, 1\], got 1.5"):
        re_rank(q_g, q_q, g_g, lambda_value=1.5)
    for nq, ng in ((1, 0), (0, 0)):
        with pytest.raises(ValueError, match=f"at least one query and one gallery image, got {nq} x {ng}"):
            re_rank(np.zeros((nq, ng)), np.zeros((nq, nq)), np.zeros((ng, ng)))


def test_non_finite_or_all_zero_distances_are_an_error_not_nan():
    q_g, q_q, g_g = _clusters(2, nq=3, ng=5)
    bad = q_g.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="re_rank: the distances hold NaN or inf"):
        re_rank(bad, q_q, g_g)
    # Identical features: every distance 0, and the normalisation divided by 0 (all NaN before).
    with pytest.raises(ValueError, match="all distances of query 0 are 0"):
        re_rank(np.zeros_like(q_g), np.zeros_like(q_q), np.zeros_like(g_g))
    g_g_zero, q_g_zero = g_g.copy(), q_g.copy()
    g_g_zero[3], g_g_zero[:, 3], q_g_zero[:, 3] = 0, 0, 0  # gallery 3 at distance 0 from everything
    with pytest.raises(ValueError, match="all distances of gallery 3 are 0"):
        re_rank(q_g_zero, q_q, g_g_zero)


def test_peak_memory_is_one_pooled_copy_plus_the_result():
    # The docstring's memory statement, measured: numpy and scipy arrays are traced by tracemalloc.
    # One float32 (N, N) pooled matrix plus the float32 (Q, G) result, and some slack for the sparse V,
    # the argsort chunks and the (N, k1+1, k1+1) reciprocity test (small for N = 1500, k1 = 6). Float64
    # (Q, N) Jaccard/final matrices, a second (N, N) copy or whole int64 argsorts would not fit.
    nq = ng = 750
    n = nq + ng
    dists = [d.astype(np.float32) for d in _clusters(3, nq=nq, ng=ng)]  # float32: no input copies
    tracemalloc.start()
    try:
        got = re_rank(*dists, k1=6, k2=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.dtype == np.float32 and got.shape == (nq, ng)
    budget = 4 * n * n + 4 * nq * ng
    assert peak <= 1.2 * budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"
