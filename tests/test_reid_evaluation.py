"""Market-1501 evaluation against hand-worked cases and a slow loop over queries."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ptl_fused.reid import evaluate


def _slow_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The protocol written as a plain loop, independently of evaluate()."""
    cmc_all, aps = [], []
    for i in range(len(q_pids)):
        order = sorted(range(len(g_pids)), key=lambda j: (distmat[i, j], j))
        kept = [
            j
            for j in order
            if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])
        ]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            continue
        first = hits.index(True)
        cmc_all.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
        found, precisions = 0, []
        for r, h in enumerate(hits, start=1):
            if h:
                found += 1
                precisions.append(found / r)
        aps.append(sum(precisions) / len(precisions))
    return np.mean(cmc_all, axis=0), float(np.mean(aps))


def test_hand_worked_query():
    # One query (pid 1, cam 0). Gallery by distance: g0 pid 1 cam 0 (same camera: ignored),
    # g1 pid 2, g2 pid 1 cam 1 (true, rank 2 after removal), g3 pid -1 (junk), g4 pid 1 cam 2 (rank 4).
    dist = np.array([[0.1, 0.2, 0.3, 0.35, 0.5, 0.6]])
    g_pids = np.array([1, 2, 1, -1, 3, 1])
    g_cams = np.array([0, 1, 1, 1, 1, 2])
    cmc, m_ap = evaluate(dist, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=5)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1])
    # Kept ranking: g1 (miss), g2 (hit, 1/2), g4 (miss), g5 (hit, 2/4) -> AP = (0.5 + 0.5) / 2.
    assert m_ap == pytest.approx(0.5)


def test_query_without_valid_match_is_skipped_with_warning():
    dist = np.array([[0.1, 0.2], [0.3, 0.1]])
    with pytest.warns(UserWarning, match="1 of 2 queries have no true match"):
        cmc, m_ap = evaluate(
            dist, np.array([1, 2]), np.array([2, 1]), np.array([0, 0]), np.array([1, 0]), max_rank=2
        )
    np.testing.assert_allclose(
        cmc, [0, 1]
    )  # only query 0 counts: its match (pid 1... cam 0) is removed? no: g1
    assert m_ap == pytest.approx(0.5)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_slow_loop_on_random_data(chunk_size):
    rng = np.random.default_rng(0)
    nq, ng = 23, 61
    q_pids, g_pids = rng.integers(0, 8, nq), rng.integers(-1, 8, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.integers(0, 20, (nq, ng)).astype(np.float32)  # many ties: order must be stable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some random queries have no valid match
        cmc, m_ap = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=chunk_size)
    want_cmc, want_ap = _slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams, 10)
    np.testing.assert_allclose(cmc, want_cmc)
    assert m_ap == pytest.approx(want_ap)


def test_shape_errors():
    with pytest.raises(ValueError, match="3 query rows but q_pids/q_camids have 2/2"):
        evaluate(np.zeros((3, 4)), [1, 2], [1, 2, 3, 4], [0, 0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        evaluate(np.zeros(4), [1], [1, 2, 3, 4], [0], [1, 1, 1, 1])
