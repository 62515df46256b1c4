"""ReID losses against slow per-sample loops written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ptl_fused.reid import CrossEntropyLabelSmooth, ReIDLoss, TripletLoss


def _slow_label_smooth_ce(logits, targets, eps):
    total = 0.0
    num_classes = logits.shape[1]
    for row, y in zip(logits.tolist(), targets.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        for c, v in enumerate(row):
            q = (1 - eps) * (c == y) + eps / num_classes
            total -= q * (v - log_z)
    return total / len(targets)


def _slow_triplet(x, targets, margin, soft):
    n, total = len(targets), 0.0
    dist = [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]
    for a in range(n):
        d_ap = max(dist[a][p] for p in range(n) if targets[p] == targets[a])
        d_an = min(dist[a][q] for q in range(n) if targets[q] != targets[a])
        total += math.log1p(math.exp(d_ap - d_an)) if soft else max(0.0, d_ap - d_an + margin)
    return total / n


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smooth_ce_matches_loop(eps):
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 3, 6, 3, 1])
    got = CrossEntropyLabelSmooth(7, eps)(logits, targets)
    assert got.item() == pytest.approx(_slow_label_smooth_ce(logits, targets, eps), rel=1e-12)
    if eps == 0:
        assert got.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-12)


def test_label_smooth_ce_errors():
    with pytest.raises(ValueError, match=r"logits must be \(B, 7\), got \(5, 6\)"):
        CrossEntropyLabelSmooth(7)(torch.randn(5, 6), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="epsilon must be in"):
        CrossEntropyLabelSmooth(7, 1.0)


@pytest.mark.parametrize("soft", [False, True])
def test_triplet_matches_loop(soft):
    torch.manual_seed(1)
    x = torch.randn(8, 5, dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # id 3 has a single image: its positive is itself
    got = TripletLoss(margin=0.3, soft_margin=soft)(x, targets)
    assert got.item() == pytest.approx(_slow_triplet(x, targets, 0.3, soft), abs=1e-5)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triplet_under_autocast_keeps_float32_distances(amp):
    # Embeddings of norm ~100 (bf16) / ~300 (fp16), as a ReID head gives: autocast's low-precision
    # x @ x.t() moved bf16's loss by 7% (the hardest negative of 12 anchors in 32 changed), and
    # overflowed fp16's Gram matrix to inf (loss = the margin, zero gradient).
    torch.manual_seed(0)
    scale = 2.2 if amp is torch.bfloat16 else 6.7
    x = (torch.randn(32, 2048) * scale).requires_grad_()
    t = torch.arange(8).repeat_interleave(4)
    loss = TripletLoss(margin=0.3)
    expected = loss(x, t)
    (g_expected,) = torch.autograd.grad(expected, x)
    with torch.autocast("cpu", dtype=amp):
        got = loss(x, t)
    (g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g, g_expected)


def test_triplet_hand_worked_and_gradient():
    # On a line: a0=0, a1=1 (id 0), b0=3, b1=3.5 (id 1). (hardest positive, hardest negative):
    # a0 (1, 3), a1 (1, 2), b0 (0.5, 2), b1 (0.5, 2.5). Margin 0.3: all d_ap - d_an + m < 0 -> 0.
    # Margin 1.5: a1 gives 1 - 2 + 1.5 = 0.5, b0 gives 0, the others < 0 -> mean 0.5 / 4.
    x = torch.tensor([[0.0], [1.0], [3.0], [3.5]], requires_grad=True)
    t = torch.tensor([0, 0, 1, 1])
    assert TripletLoss(0.3)(x, t).item() == pytest.approx(0.0, abs=1e-6)
    loss = TripletLoss(1.5)(x, t)
    assert loss.item() == pytest.approx(0.5 / 4, abs=1e-6)
    loss.backward()  # finite despite zero self-distances
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="at least two identities"):
        TripletLoss()(x, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reid_loss_combines_terms(reduction):
    torch.manual_seed(2)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = [torch.randn(6, 3, dtype=torch.float64) for _ in range(3)]
    feats = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]
    loss = ReIDLoss(3, epsilon=0.1, margin=0.3, ce_weight=0.5, triplet_weight=2.0, reduction=reduction)
    out = loss(logits, feats, targets)
    ces = [_slow_label_smooth_ce(z, targets, 0.1) for z in logits]
    tris = [_slow_triplet(f, targets, 0.3, False) for f in feats]
    agg = (lambda v: sum(v) / len(v)) if reduction == "mean" else sum
    assert out.cross_entropy.item() == pytest.approx(agg(ces), rel=1e-9)
    assert out.triplet.item() == pytest.approx(agg(tris), abs=1e-5)
    assert out.total.item() == pytest.approx(0.5 * agg(ces) + 2.0 * agg(tris), abs=1e-5)


def test_reid_loss_single_tensors_and_zero_weight():
    targets = torch.tensor([0, 0, 1, 1])
    logits, feats = torch.randn(4, 2), torch.randn(4, 3)
    out = ReIDLoss(2, triplet_weight=0.0)(logits, feats, targets)
    assert out.triplet.item() == 0.0 and out.total.item() == pytest.approx(out.cross_entropy.item())
    with pytest.raises(ValueError, match="reduction must be"):
        ReIDLoss(2, reduction="max")
