"""Multi-positive symmetric InfoNCE against a plain loop reference; the training loss on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlmm.errors import NlmmError
from nlmm.model.losses import (MAX_LOGIT_SCALE, ContrastiveLoss, ForwardOutput, contrastive_loss,
                               logit_scale_value)


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
    got = contrastive_loss(a, b, ids, ids, torch.tensor(10.0))
    assert got.item() == pytest.approx(reference_loss(a, b, ids, ids, 10.0), rel=1e-5)


def test_unequal_sides_and_queries_without_positive():
    a, b = unit(4, 5, 2), unit(3, 5, 3)
    ids_a, ids_b = torch.tensor([0, 1, 2, 9]), torch.tensor([2, 0, 1])  # id 9 has no partner
    log_scale = torch.tensor(math.log(5.0), requires_grad=True)
    got = contrastive_loss(a, b, ids_a, ids_b, logit_scale_value(log_scale))
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
    scale = torch.tensor(20.0)
    multi = contrastive_loss(a, b, same_image, same_image, scale)
    diagonal = contrastive_loss(a, b, torch.arange(4), torch.arange(4), scale)
    assert multi.item() < diagonal.item() - 0.3
    diagonal_reference = reference_loss(a, b, torch.arange(4), torch.arange(4), 20.0)
    assert diagonal.item() == pytest.approx(diagonal_reference, rel=1e-5)


def test_scale_is_clamped_at_100():
    a, b = unit(5, 4, 5), unit(5, 4, 6)
    ids = torch.arange(5)
    too_big = torch.tensor(math.log(1000.0), requires_grad=True)
    got = contrastive_loss(a, b, ids, ids, logit_scale_value(too_big))
    assert got.item() == pytest.approx(reference_loss(a, b, ids, ids, MAX_LOGIT_SCALE), rel=1e-5)
    got.backward()
    assert too_big.grad.item() == 0.0


def test_perfect_alignment_gives_near_zero_loss():
    a = torch.eye(4, dtype=torch.float64)
    ids = torch.arange(4)
    assert contrastive_loss(a, a, ids, ids, torch.tensor(100.0)).item() < 1e-10


def forward_output(log_scale: torch.Tensor) -> ForwardOutput:
    """Three modalities of 6 rows (two images captioned twice), audio on 4 rows, a TTT loss."""
    audio_rows = torch.tensor([True, False, True, True, False, True])
    embeddings = {"image": unit(6, 8, 7), "text": unit(6, 8, 8), "audio": unit(4, 8, 9)}
    embeddings = {m: e.float().requires_grad_() for m, e in embeddings.items()}
    return ForwardOutput(embeddings, torch.tensor([0, 0, 1, 2, 2, 3]), audio_rows,
                         logit_scale_value(log_scale), loss_ttt=torch.tensor(0.5))


def test_the_gathered_loss_of_one_process_is_the_local_loss(tmp_path):
    """The data-parallel path (gather, scatter of the audio rows, the zero-weighted local term)
    gives the single-process losses and gradients; a process group of one runs it."""
    import torch.distributed as dist

    weights = {"i2t": 2.0, "i2a": 1.0, "t2a": 0.5}
    results = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        for gather in (False, True):
            log_scale = torch.tensor(math.log(14.0), requires_grad=True)
            out = forward_output(log_scale)
            losses = ContrastiveLoss(weights, aux_weight=0.1, gather=gather)(out)
            losses["loss"].backward()
            results.append((losses, {m: e.grad for m, e in out.embeddings.items()}, log_scale.grad))
    finally:
        dist.destroy_process_group()
    (local, local_grads, local_scale), (gathered, gathered_grads, gathered_scale) = results
    assert set(local) == set(gathered) == {"loss", "loss_i2t", "loss_i2a", "loss_t2a", "loss_ttt",
                                           "temperature"}
    for key in local:
        torch.testing.assert_close(gathered[key], local[key])
    pairs = (2.0 * local["loss_i2t"] + local["loss_i2a"] + 0.5 * local["loss_t2a"]) / 3.5
    torch.testing.assert_close(local["loss"], pairs + 0.1 * 0.5)
    assert local["temperature"].item() == pytest.approx(1 / 14.0)
    for modality in local_grads:
        torch.testing.assert_close(gathered_grads[modality], local_grads[modality])
    torch.testing.assert_close(gathered_scale, local_scale)


def test_a_batch_without_a_weighted_pair_is_refused_before_any_gather():
    out = forward_output(torch.tensor(math.log(14.0)))
    for gather in (False, True):  # no process group: a gather would fail with another error
        with pytest.raises(NlmmError, match="no modality pair with a positive loss weight"):
            ContrastiveLoss({"i2t": 1.0}, gather=gather)(
                ForwardOutput({"image": out.embeddings["image"]}, out.image_ids, None, out.scale))


def mixed_output(log_scale):
    """A batch of a mixture: rows 0-3 have an image (a Flickr-like corpus), rows 2-5 a clip
    (an AudioCaps-like one), every row a caption; rows 2-3 have all three."""
    image_rows = torch.tensor([True, True, True, True, False, False])
    audio_rows = torch.tensor([False, False, True, True, True, True])
    embeddings = {"image": unit(4, 8, 11).float().requires_grad_(),
                  "text": unit(6, 8, 12).float().requires_grad_(),
                  "audio": unit(4, 8, 13).float().requires_grad_()}
    return ForwardOutput(embeddings, torch.tensor([0, 1, 2, 3, 4, 5]), audio_rows,
                         logit_scale_value(log_scale), image_rows=image_rows)


def test_each_pair_is_scored_over_the_rows_that_have_both_sides(tmp_path):
    import torch.distributed as dist

    log_scale = torch.tensor(math.log(10.0))
    out = mixed_output(log_scale)
    e, ids, scale = out.embeddings, out.image_ids, float(out.scale)
    local = ContrastiveLoss({"i2t": 1.0, "i2a": 1.0, "t2a": 1.0})(out)
    # image rows 2-3 are the image embeddings 2-3; audio rows 2-3 are audio embeddings 0-1
    expected = {"loss_i2t": reference_loss(e["image"], e["text"][:4], ids[:4], ids[:4], scale),
                "loss_i2a": reference_loss(e["image"][2:], e["audio"][:2], ids[2:4], ids[2:4],
                                           scale),
                "loss_t2a": reference_loss(e["text"][2:], e["audio"], ids[2:], ids[2:], scale)}
    for key, value in expected.items():
        assert float(local[key]) == pytest.approx(value, rel=1e-5), key
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        gathered = ContrastiveLoss({"i2t": 1.0, "i2a": 1.0, "t2a": 1.0}, gather=True)(
            mixed_output(log_scale))
    finally:
        dist.destroy_process_group()
    for key in expected:
        torch.testing.assert_close(gathered[key], local[key])


def test_a_pair_on_fewer_than_two_rows_is_skipped_for_the_step():
    out = mixed_output(torch.tensor(math.log(10.0)))
    out.image_rows = torch.tensor([False, False, True, False, False, False])
    out.embeddings["image"] = out.embeddings["image"][:1]
    losses = ContrastiveLoss({"i2t": 1.0, "i2a": 1.0, "t2a": 1.0})(out)
    assert "loss_i2t" not in losses and "loss_i2a" not in losses and "loss_t2a" in losses
