"""Multi-positive symmetric InfoNCE against a plain loop reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlmm.model.losses import MAX_LOGIT_SCALE, contrastive_loss


def reference_loss(a, b, ids_a, ids_b, scale):
    """-log(sum of softmax mass on positives), averaged per direction, then over directions."""
    def one_direction(x, y, ids_x, ids_y):
        total, rows = 0.0, 0
        for i in range(len(x)):
            exps = [math.exp(scale * float(x[i] @ y[j])) for j in range(len(y))]
            positive = sum(e for j, e in enumerate(exps) if int(ids_x[i]) == int(ids_y[j]))
            if positive == 0.0:
                continue
            total += -math.log(positive / sum(exps))
            rows += 1
        return total / rows
    return 0.5 * (one_direction(a, b, ids_a, ids_b) + one_direction(b, a, ids_b, ids_a))


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_matches_loop_reference_with_duplicate_image_ids():
    a, b = unit(6, 5, 0), unit(6, 5, 1)
    ids = torch.tensor([3, 3, 7, 1, 7, 7])
    log_scale = torch.tensor(math.log(10.0))
    got = contrastive_loss(a, b, ids, ids, log_scale)
    assert got.item() == pytest.approx(reference_loss(a, b, ids, ids, 10.0), rel=1e-5)


def test_unequal_sides_and_queries_without_positive():
    a, b = unit(4, 5, 2), unit(3, 5, 3)
    ids_a, ids_b = torch.tensor([0, 1, 2, 9]), torch.tensor([2, 0, 1])  # id 9 has no partner
    log_scale = torch.tensor(math.log(5.0), requires_grad=True)
    got = contrastive_loss(a, b, ids_a, ids_b, log_scale)
    assert got.item() == pytest.approx(reference_loss(a, b, ids_a, ids_b, 5.0), rel=1e-5)
    got.backward()
    assert torch.isfinite(log_scale.grad)


def test_duplicates_are_positives_not_negatives():
    # Rows 0 and 1 are two captions of the same image and embed identically: treating row 1 as
    # a negative of row 0 (diagonal-only targets) would keep half the mass on a "wrong" column.
    a = unit(4, 8, 4)
    a[1] = a[0]
    b = a.clone()
    same_image = torch.tensor([0, 0, 1, 2])
    scale = torch.tensor(math.log(20.0))
    multi = contrastive_loss(a, b, same_image, same_image, scale)
    diagonal = contrastive_loss(a, b, torch.arange(4), torch.arange(4), scale)
    assert multi.item() < diagonal.item() - 0.3
    diagonal_reference = reference_loss(a, b, torch.arange(4), torch.arange(4), 20.0)
    assert diagonal.item() == pytest.approx(diagonal_reference, rel=1e-5)


def test_scale_is_clamped_at_100():
    a, b = unit(5, 4, 5), unit(5, 4, 6)
    ids = torch.arange(5)
    too_big = torch.tensor(math.log(1000.0), requires_grad=True)
    got = contrastive_loss(a, b, ids, ids, too_big)
    assert got.item() == pytest.approx(reference_loss(a, b, ids, ids, MAX_LOGIT_SCALE), rel=1e-5)
    got.backward()
    assert too_big.grad.item() == 0.0


def test_perfect_alignment_gives_near_zero_loss():
    a = torch.eye(4, dtype=torch.float64)
    ids = torch.arange(4)
    assert contrastive_loss(a, a, ids, ids, torch.tensor(math.log(100.0))).item() < 1e-10
