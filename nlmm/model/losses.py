"""Symmetric multi-positive InfoNCE with a CLIP-style learnable temperature.

Every pair (i, j) with `ids_a[i] == ids_b[j]` is a positive: the other captions / spoken
captions of the same image are never pushed away as negatives. The loss of a query is
`-log(sum of its softmax mass over all its positives)` (SupCon's "L_in" form), not the mean
of `-log p` over positives, because:
- it matches how retrieval is scored (a hit when ANY item of the same image ranks high), so the
  query is satisfied however the mass is split among its positives;
- it reaches zero when all mass sits on positives, while the mean-over-positives form has a
  floor of log(#positives) and keeps pulling duplicates apart to split the mass evenly.
Queries without any positive in the batch contribute nothing (they cannot be scored).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_LOGIT_SCALE = 100.0
INIT_TEMPERATURE = 0.07
INIT_LOGIT_SCALE = math.log(1.0 / INIT_TEMPERATURE)


def logit_scale_value(logit_scale: Tensor) -> Tensor:
    """exp(log-scale) clamped to MAX_LOGIT_SCALE, as CLIP does, in fp32."""
    return logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)


def _directional(logits: Tensor, positive: Tensor) -> Tensor:
    """Mean over rows of -log(softmax mass on the row's positives), rows without one skipped."""
    has_positive = positive.any(dim=1)
    # Rows with no positive keep finite logits here so that no inf/NaN reaches the backward pass.
    pos_logits = logits.masked_fill(~(positive | ~has_positive[:, None]), float("-inf"))
    per_row = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)
    per_row = per_row * has_positive
    return per_row.sum() / has_positive.sum().clamp(min=1)


def contrastive_loss(a: Tensor, b: Tensor, ids_a: Tensor, ids_b: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between L2-normalised (Na, E) `a` and (Nb, E) `b`.

    `ids_a`/`ids_b` are the image ids of the rows; `logit_scale` is the log of the inverse
    temperature (a learnable scalar). Returns the mean of the a->b and b->a losses (fp32).
    """
    logits = logit_scale_value(logit_scale) * (a.float() @ b.float().T)
    positive = ids_a[:, None] == ids_b[None, :]
    return 0.5 * (_directional(logits, positive) + _directional(logits.T, positive.T))


PAIR_MODALITIES = {"i2t": ("image", "text"), "i2a": ("image", "audio"), "t2a": ("text", "audio")}


def pair_losses(embeddings: dict[str, Tensor], image_ids: Tensor, audio_rows: Tensor | None,
                logit_scale: Tensor, weights: dict[str, float]) -> dict[str, Tensor]:
    """`loss_<pair>` for every pair of modalities present, and `loss`, their weighted mean.

    `embeddings["audio"]` holds only the rows flagged in `audio_rows`, so the other side of an
    audio pair is cut to those rows too. Shared by the model's forward and the distributed
    trainer (which calls it on embeddings gathered from all ranks).
    """
    from nlmm.errors import NlmmError

    out: dict[str, Tensor] = {}
    weighted, weight_sum = None, 0.0
    for pair, (a, b) in PAIR_MODALITIES.items():
        if a not in embeddings or b not in embeddings:
            continue
        emb_a, ids = embeddings[a], image_ids
        if b == "audio":
            if embeddings["audio"].shape[0] < 2:
                continue  # one row has no negatives: the loss would be a constant zero
            emb_a, ids = emb_a[audio_rows], image_ids[audio_rows]
        loss = contrastive_loss(emb_a, embeddings[b], ids, ids, logit_scale)
        out[f"loss_{pair}"] = loss
        weight = float(weights.get(pair, 0.0))
        if weight > 0:
            weighted = loss * weight if weighted is None else weighted + loss * weight
            weight_sum += weight
    if weighted is None:
        raise NlmmError("the batch gives no modality pair with a positive loss weight; it needs "
                        "two modalities (audio on at least two rows) weighted in train.loss_weights.")
    out["loss"] = weighted / weight_sum
    return out
