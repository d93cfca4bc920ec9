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

`ContrastiveLoss` turns a training forward's `ForwardOutput` into the losses the loop
optimises and logs, in one process and, gathering the embeddings of all ranks first, under
data-parallel training: the one implementation of the training objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nlmm.config import Config
from nlmm.errors import NlmmError
from nlmm.model.gather import gather_ragged, gather_rows

MAX_LOGIT_SCALE = 100.0
INIT_TEMPERATURE = 0.07
INIT_LOGIT_SCALE = math.log(1.0 / INIT_TEMPERATURE)
PAIR_MODALITIES = {"i2t": ("image", "text"), "i2a": ("image", "audio"), "t2a": ("text", "audio")}


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


def contrastive_loss(a: Tensor, b: Tensor, ids_a: Tensor, ids_b: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between L2-normalised (Na, E) `a` and (Nb, E) `b`.

    `ids_a`/`ids_b` are the image ids of the rows; `scale` is the inverse temperature
    (`logit_scale_value` of the learnable log-scale). Returns the mean of the a->b and b->a
    losses (fp32).
    """
    logits = scale * (a.float() @ b.float().T)
    positive = ids_a[:, None] == ids_b[None, :]
    return 0.5 * (_directional(logits, positive) + _directional(logits.T, positive.T))


@dataclass
class ForwardOutput:
    """What a training forward hands the loss (`NLMM.forward`, the benchmarks' reference model).

    embeddings: (rows, E) L2-normalised embeddings of every modality encoded; "image" and
        "audio" hold only the rows flagged in `image_rows` / `audio_rows` and are absent when
        no row has that modality.
    image_ids: (B,) the group (image or clip) of each row: rows of one group are positives.
    audio_rows: (B,) bool, the rows whose audio was encoded; None when the batch has no audio.
    scale: the inverse temperature (`logit_scale_value`), with gradient to the log-scale.
    loss_ttt: the test-time-training self-supervised loss of the batch (joint training), or None.
    image_rows: (B,) bool, the rows whose image was encoded; None: every row (or no image).
    """

    embeddings: dict[str, Tensor]
    image_ids: Tensor
    audio_rows: Tensor | None
    scale: Tensor
    loss_ttt: Tensor | None = None
    image_rows: Tensor | None = None


def _no_weighted_pair() -> NlmmError:
    return NlmmError("the batch gives no modality pair with a positive loss weight; it needs two "
                     "modalities (audio on at least two rows) weighted in train.loss_weights.")


# A pair with fewer rows than this in a batch has no negatives to contrast: it is skipped.
MIN_PAIR_ROWS = 2


def _pair_rows(emb: Tensor, rows: Tensor | None, both: Tensor | None) -> Tensor:
    """The rows of `both` out of embeddings that hold only the rows flagged in `rows`."""
    if both is None:
        return emb
    return emb[both[rows]] if rows is not None else emb[both]


def pair_losses(embeddings: Mapping[str, Tensor], image_ids: Tensor, audio_rows: Tensor | None,
                scale: Tensor, weights: Mapping[str, float],
                image_rows: Tensor | None = None) -> dict[str, Tensor]:
    """`loss_<pair>` for every pair of modalities present on at least MIN_PAIR_ROWS rows, and
    `loss`, their weighted mean. Each pair is scored over the rows that have both of its sides
    (`embeddings["image"/"audio"]` hold only the rows flagged in `image_rows` / `audio_rows`)."""
    rows = {"image": image_rows, "audio": audio_rows, "text": None}
    out: dict[str, Tensor] = {}
    weighted, weight_sum = None, 0.0
    for pair, (a, b) in PAIR_MODALITIES.items():
        if a not in embeddings or b not in embeddings:
            continue
        ra, rb = rows[a], rows[b]
        both = ra if rb is None else rb if ra is None else ra & rb
        n = image_ids.shape[0] if both is None else int(both.sum())
        if n < MIN_PAIR_ROWS:
            continue  # one row has no negatives: the loss would be a constant zero
        ids = image_ids if both is None else image_ids[both]
        loss = contrastive_loss(_pair_rows(embeddings[a], ra, both),
                                _pair_rows(embeddings[b], rb, both), ids, ids, scale)
        out[f"loss_{pair}"] = loss
        weight = float(weights.get(pair, 0.0))
        if weight > 0:
            weighted = loss * weight if weighted is None else weighted + loss * weight
            weight_sum += weight
    if weighted is None:
        raise _no_weighted_pair()
    out["loss"] = weighted / weight_sum
    return out


class ContrastiveLoss(nn.Module):
    """The training objective of a `ForwardOutput`: `loss_<pair>` for every pair present, `loss`
    (their mean weighted by `weights`, a pair missing from them counting 0, plus `aux_weight`
    × `loss_ttt` when the forward computed one), `loss_ttt`, and the `temperature` (detached).

    With `gather` (data-parallel training: every rank calls it on the output of its shard of
    the global batch) the embeddings and labels of all ranks are gathered first, with gradient,
    so the negatives span the global batch and every rank computes the loss one process would
    compute on it. The gather's backward sums the gradients of a rank's rows over all ranks (W
    times the gradient of the one loss), and DDP's averaging over the W ranks cancels that W.
    `loss_ttt` is per row, so a shard's own mean is its share: DDP's averaging makes it the
    global batch's mean (the logged value is the shard's). Every rank must pass the same
    modalities, and `image_ids` must be the global batch's ids (as the loader gives them).
    """

    def __init__(self, weights: Mapping[str, float], aux_weight: float = 0.0,
                 gather: bool = False) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.aux_weight = aux_weight
        self.gather = gather

    @classmethod
    def from_config(cls, cfg: Config, gather: bool = False) -> ContrastiveLoss:
        """Pair weights from `train.loss_weights`, the auxiliary weight from `ttt.aux_weight`
        (a model without `ttt.enable` computes no `loss_ttt`, so it then adds nothing)."""
        return cls(cfg.train.loss_weights, cfg.ttt.aux_weight, gather)

    def forward(self, out: ForwardOutput) -> dict[str, Tensor]:
        if self.gather:
            losses = self._global_pair_losses(out)
        else:
            losses = pair_losses(out.embeddings, out.image_ids, out.audio_rows, out.scale,
                                 self.weights, out.image_rows)
        if out.loss_ttt is not None:
            losses["loss_ttt"] = out.loss_ttt
            losses["loss"] = losses["loss"] + self.aux_weight * out.loss_ttt
        losses["temperature"] = 1.0 / out.scale.detach()
        return losses

    def _global_pair_losses(self, out: ForwardOutput) -> dict[str, Tensor]:
        present = set(out.embeddings) | ({"audio"} if out.audio_rows is not None else set()) \
            | ({"image"} if out.image_rows is not None else set())
        if not any(self.weights.get(pair, 0.0) > 0 and {a, b} <= present
                   for pair, (a, b) in PAIR_MODALITIES.items()):
            raise _no_weighted_pair()  # on every rank alike, before any collective
        image_ids = gather_ragged(out.image_ids)
        embeddings = {m: gather_rows(out.embeddings[m]) for m in ("image", "text")
                      if m in out.embeddings and not (m == "image" and out.image_rows is not None)}
        # a weighted pair is present, so some modality gives the embedding width
        width = next(iter(out.embeddings.values())).shape[1] if out.embeddings else 1
        gathered_rows: dict[str, Tensor | None] = {"image": None, "audio": None}
        for modality, rows_here in (("image", out.image_rows), ("audio", out.audio_rows)):
            if rows_here is None:
                continue
            # Scattered into one row per caption so that every rank sends a block of the same
            # size.
            full = torch.zeros(rows_here.shape[0], width, device=rows_here.device)
            if modality in out.embeddings:
                full = full.index_put((rows_here.nonzero().squeeze(1),),
                                      out.embeddings[modality].float())
            rows_all = gather_ragged(rows_here)
            gathered = gather_rows(full)
            gathered_rows[modality] = rows_all
            if bool(rows_all.any()):
                embeddings[modality] = gathered[rows_all]
        losses = pair_losses(embeddings, image_ids, gathered_rows["audio"], out.scale,
                             self.weights, gathered_rows["image"])
        # Each local embedding enters the loss, even one the global batch leaves out (a lone
        # spoken caption), because DDP waits for a gradient of every parameter its forward used.
        untouched = sum(e.sum() for e in out.embeddings.values()) * 0.0
        losses["loss"] = losses["loss"] + untouched
        return losses
