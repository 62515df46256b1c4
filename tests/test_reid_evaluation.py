"""ReID evaluation (Market-1501 and CUHK03 protocols), features and distances, against hand-worked
cases, slow loops and exact expectations."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch

from ptl_fused.reid import compute_distance, evaluate, evaluate_features, extract_features


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


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_matches_slow_loop_on_random_data(chunk):
    rng = np.random.default_rng(0)
    nq, ng = 23, 61
    q_pids, g_pids = rng.integers(0, 8, nq), rng.integers(-1, 8, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.integers(0, 20, (nq, ng)).astype(np.float32)  # many ties: order must be stable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some random queries have no valid match
        cmc, m_ap = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk=chunk)
    want_cmc, want_ap = _slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams, 10)
    np.testing.assert_allclose(cmc, want_cmc)
    assert m_ap == pytest.approx(want_ap)


def test_shape_errors():
    with pytest.raises(ValueError, match="3 query rows but q_pids/q_camids have 2/2"):
        evaluate(np.zeros((3, 4)), [1, 2], [1, 2, 3, 4], [0, 0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        evaluate(np.zeros(4), [1], [1, 2, 3, 4], [0], [1, 1, 1, 1])


def test_ids_of_any_integer_dtype_and_count_errors():
    # In uint8 the junk id -1 is 255: identity 255 must still be a real identity.
    dist = np.array([[0.1, 0.5]])
    cmc, mAP = evaluate(dist, np.array([255], np.uint8), np.array([255, 3], np.uint8), [0], [1, 1])
    assert cmc[0] == 1 and mAP == 1
    for bad in (dict(chunk=0), dict(chunk=-1), dict(max_rank=3.0)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got"):
            evaluate(dist, [1], [1, 3], [0], [1, 1], **bad)
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        evaluate_features(torch.ones(1, 2), torch.ones(2, 2), [1], [1, 3], [0], [1, 1], chunk=0)


def test_nan_distances_or_features_are_an_error_not_a_score():
    # NaN sorts last and an all-NaN row keeps gallery order: a diverged run scored rank-1 0.02,
    # mAP 0.06, without a word. The error names the query rows.
    dist = np.random.default_rng(0).random((8, 6))
    dist[[2, 5], 1] = np.nan
    ids = dict(q_pids=np.arange(8) % 3, g_pids=np.arange(6) % 3, q_camids=np.zeros(8), g_camids=np.ones(6))
    with pytest.raises(ValueError, match=r"NaN distances for query rows 2, 5: the features are not finite"):
        evaluate(dist, **ids, max_rank=3)
    dist[2, 1] = 0.5
    with pytest.raises(ValueError, match=r"NaN distances for query rows 5:"):
        evaluate(dist, **ids, max_rank=3, chunk=4)  # in the second chunk, counted from 0
    qf, gf = torch.randn(8, 4), torch.randn(6, 4)
    qf[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN distances for query rows 7:"):
        evaluate_features(qf, gf, **ids, max_rank=3, chunk=3)


def test_a_query_row_of_infinities_is_an_error_but_some_infinities_are_a_ranking():
    dist = np.random.default_rng(0).random((8, 6))
    ids = dict(q_pids=np.arange(8) % 3, g_pids=np.arange(6) % 3, q_camids=np.zeros(8), g_camids=np.ones(6))
    dist[3, [0, 1, 2, 4, 5]] = np.inf  # masked out but one: still a ranking, the same as a large value
    cmc, mAP = evaluate(dist, **ids, max_rank=3)
    big = np.where(np.isinf(dist), 1e9, dist)
    np.testing.assert_allclose(cmc, evaluate(big, **ids, max_rank=3)[0])
    assert mAP == pytest.approx(evaluate(big, **ids, max_rank=3)[1])
    dist[[3, 6]] = np.inf
    with pytest.raises(ValueError, match=r"query rows 3, 6 have no finite distance to any gallery image"):
        evaluate(dist, **ids, max_rank=3)
    dist[3] = 0.5
    with pytest.raises(ValueError, match=r"query rows 6 have"):
        evaluate(dist, **ids, max_rank=3, chunk=5)  # in the second chunk, counted from 0


# ---------------------------------------------------------------- CUHK03 single-gallery-shot protocol
def _cuhk03_case():
    # One query (pid 1, cam 0). Gallery by distance: a pid 2, b pid 1 cam 1, c pid 2, d pid 1 cam 1,
    # e pid 1 cam 0 (same camera as the query: removed). One image per identity is drawn:
    # the query's match is at rank 1 only if pid 2 draws c and pid 1 draws b: probability 1/4.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.05]])
    g_pids, g_cams = np.array([2, 1, 2, 1, 1]), np.array([1, 1, 1, 1, 0])
    return dist, np.array([1]), g_pids, np.array([0]), g_cams


def test_cuhk03_hand_worked_probability():
    dist, q_pids, g_pids, q_cams, g_cams = _cuhk03_case()
    cmc, m_ap = evaluate(
        dist, q_pids, g_pids, q_cams, g_cams, max_rank=3, protocol="cuhk03", num_repeats=4000
    )
    assert cmc[0] == pytest.approx(0.25, abs=0.03)  # 4 standard deviations of the 4000-draw mean
    np.testing.assert_allclose(cmc[1:], [1, 1])  # at worst the match is second of two identities
    # AP is that of the full kept ranking a, b, c, d: (1/2 + 2/4) / 2.
    assert m_ap == pytest.approx(0.5)
    cmc10, _ = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3, protocol="cuhk03")
    assert cmc10[0] * 10 == pytest.approx(round(cmc10[0] * 10))  # a mean of 10 draws of 0 or 1


def test_cuhk03_seeded_and_chunk_invariant():
    rng = np.random.default_rng(3)
    nq, ng = 9, 30
    q_pids, g_pids = rng.integers(0, 4, nq), rng.integers(0, 4, ng)
    q_cams, g_cams = rng.integers(0, 2, nq), rng.integers(0, 2, ng)
    dist = rng.random((nq, ng))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [
            evaluate(dist, q_pids, g_pids, q_cams, g_cams, 5, chunk, protocol="cuhk03", seed=seed)
            for chunk, seed in ((1, 0), (4, 0), (1024, 0), (1024, 1))
        ]
    for cmc, m_ap in runs[1:3]:
        np.testing.assert_array_equal(cmc, runs[0][0])
        assert m_ap == pytest.approx(runs[0][1], rel=1e-12)  # up to the order of summation
    assert not np.array_equal(runs[3][0], runs[0][0])  # another seed, other draws


def test_cuhk03_equals_market_when_each_identity_has_one_image():
    rng = np.random.default_rng(4)
    nq, ng = 12, 25
    g_pids = rng.permutation(ng)  # one gallery image per identity: nothing random is left
    q_pids = rng.choice(g_pids, nq)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.random((nq, ng))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
        got = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, protocol="cuhk03")
    np.testing.assert_allclose(got[0], want[0])
    assert got[1] == pytest.approx(want[1])


def _expected_cuhk03_cmc(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Exact expectation of the single-shot CMC: for each possible drawn true match t, every
    other identity u independently lands before t with probability (its kept images before t) / |u|;
    the rank of t is 1 + the number that do (a Poisson-binomial count)."""
    all_cmc = []
    for i in range(len(q_pids)):
        order = sorted(range(len(g_pids)), key=lambda j: (distmat[i, j], j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        groups = {}
        for pos, j in enumerate(kept):
            groups.setdefault(g_pids[j], []).append(pos)
        if q_pids[i] not in groups:
            continue
        cmc = np.zeros(max_rank)
        for t in groups[q_pids[i]]:
            count = np.array([1.0])  # distribution of the number of identities drawn before t
            for pid, positions in groups.items():
                if pid != q_pids[i]:
                    p = sum(pos < t for pos in positions) / len(positions)
                    count = np.convolve(count, [1 - p, p])
            cdf = np.cumsum(count)
            cmc += np.array([cdf[min(r, len(cdf) - 1)] for r in range(max_rank)]) / len(groups[q_pids[i]])
        all_cmc.append(cmc)
    return np.mean(all_cmc, axis=0)


def test_cuhk03_matches_exact_expectation():
    rng = np.random.default_rng(5)
    nq, ng = 6, 24
    q_pids, g_pids = rng.integers(0, 5, nq), rng.integers(0, 5, ng)
    q_cams, g_cams = rng.integers(0, 2, nq), rng.integers(0, 2, ng)
    dist = rng.random((nq, ng))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmc, _ = evaluate(
            dist, q_pids, g_pids, q_cams, g_cams, max_rank=5, protocol="cuhk03", num_repeats=2000
        )
    want = _expected_cuhk03_cmc(dist, q_pids, g_pids, q_cams, g_cams, 5)
    assert 0.05 < want[0] < 0.95  # a case where the draws matter
    np.testing.assert_allclose(cmc, want, atol=0.03)


def test_protocol_errors():
    dist, q_pids, g_pids, q_cams, g_cams = _cuhk03_case()
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol="viper")
    with pytest.raises(ValueError, match="num_repeats must be >= 1"):
        evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk03", num_repeats=0)


# ---------------------------------------------------------------- features, distances, chunked evaluation
def test_compute_distance_definitions():
    torch.manual_seed(0)
    qf, gf = torch.randn(7, 5), torch.randn(11, 5)
    torch.testing.assert_close(compute_distance(qf, gf), torch.cdist(qf, gf) ** 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compute_distance(qf, gf, chunk=3), compute_distance(qf, gf))
    cos = torch.nn.functional.cosine_similarity(qf[:, None], gf[None], dim=2)
    torch.testing.assert_close(compute_distance(qf, gf, "cosine"), 1 - cos, atol=1e-6, rtol=1e-6)
    for metric in ("euclidean", "cosine"):  # float32 also when called under autocast
        big_q, big_g = qf * 100, gf * 100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = compute_distance(big_q, big_g, metric)
        torch.testing.assert_close(got, compute_distance(big_q, big_g, metric))
    with pytest.raises(ValueError, match="metric must be"):
        compute_distance(qf, gf, "manhattan")
    with pytest.raises(
        ValueError, match=r"qf and gf must be \(Nq, D\) and \(Ng, D\), got \(7, 5\) and \(11, 4\)"
    ):
        compute_distance(qf, gf[:, :4])


@pytest.mark.parametrize("protocol", ["market", "cuhk03"])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_evaluate_features_equals_full_distmat(chunk, protocol):
    rng = np.random.default_rng(6)
    nq, ng = 17, 40
    # Small integer features: every distance is exact in float32, and there are many ties.
    qf = torch.tensor(rng.integers(-2, 3, (nq, 3)), dtype=torch.float32)
    gf = torch.tensor(rng.integers(-2, 3, (ng, 3)), dtype=torch.float32)
    q_pids, g_pids = rng.integers(0, 6, nq), rng.integers(-1, 6, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = evaluate(
            compute_distance(qf, gf), q_pids, g_pids, q_cams, g_cams, max_rank=8, protocol=protocol
        )
        got = evaluate_features(
            qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=8, chunk=chunk, device="cpu", protocol=protocol
        )
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == pytest.approx(want[1], rel=1e-12)  # up to the order of summation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cos_want = evaluate(compute_distance(qf, gf, "cosine"), q_pids, g_pids, q_cams, g_cams, max_rank=8)
        cos_got = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, "cosine", max_rank=8, chunk=chunk)
    np.testing.assert_allclose(cos_got[0], cos_want[0])
    assert cos_got[1] == pytest.approx(cos_want[1])


def test_evaluate_features_shape_errors():
    with pytest.raises(ValueError, match="qf/gf has 4 gallery columns but g_pids/g_camids have 3/3"):
        evaluate_features(torch.zeros(2, 3), torch.zeros(4, 3), [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


class _Output(NamedTuple):
    feature: torch.Tensor
    logits: torch.Tensor


class _AsymmetricNet(torch.nn.Module):
    """feature = a linear map of the flattened image: differs for an image and its mirror."""

    def __init__(self, named: bool):
        super().__init__()
        self.fc, self.named = torch.nn.Linear(3 * 4 * 2, 5), named

    def forward(self, x):
        assert not self.training and not torch.is_grad_enabled()
        f = self.fc(x.flatten(1))
        return _Output(f, f.sum(1)) if self.named else f


def test_extract_features_flip_and_normalisation():
    torch.manual_seed(0)
    images = torch.randn(5, 3, 4, 2)
    data = torch.utils.data.TensorDataset(images, torch.arange(5) + 10, torch.tensor([0, 1, 0, 1, 2]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    net = _AsymmetricNet(named=True).train()
    feats, pids, camids = extract_features(net, loader, device="cpu")
    assert net.training  # restored
    with torch.no_grad():
        raw = (net.fc(images.flatten(1)) + net.fc(images.flip(3).flatten(1))) / 2
    torch.testing.assert_close(feats, torch.nn.functional.normalize(raw, dim=1))
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    np.testing.assert_array_equal(pids, np.arange(5) + 10)
    np.testing.assert_array_equal(camids, [0, 1, 0, 1, 2])
    plain_net = _AsymmetricNet(named=False)
    plain, _, _ = extract_features(plain_net, loader, flip=False, normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(plain, plain_net.fc(images.flatten(1)))
    bad = images.clone()
    bad[3, 0, 0, 0] = float("inf")  # in the second batch: images 2..3
    bad_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(bad, *data.tensors[1:]), batch_size=2
    )
    with pytest.raises(
        ValueError, match=r"non-finite features \(NaN or inf\) for images 2\.\.3 of the loader"
    ):
        extract_features(net, bad_loader, device="cpu")
    assert net.training  # restored after the error too
