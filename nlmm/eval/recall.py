"""Recall@K for cross-modal retrieval under the multi-caption protocol (REFERENCE.md).

A query is a hit at K when ANY gallery item that belongs to the same image ranks in the top K.
Counting only the diagonal as positive would treat an image's other four captions as negatives
and understate recall, a mistake several public tools make.

Ranking is pessimistic: a negative that ties with the best positive ranks above it, and a query
with any non-finite score misses. Otherwise collapsed (all identical) or NaN embeddings, the
usual signs of a broken model, would score a perfect recall.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nlmm.metric_names import DIRECTIONS, KS

# Caption-level speech retrieval: a caption's only positive is its own reading, and vice versa.
OWN_DIRECTIONS = ("t2a_own", "a2t_own")
_MODALITY = {"i": "image", "t": "text", "a": "audio"}


def best_positive_rank(query: torch.Tensor, gallery: torch.Tensor, query_owner: torch.Tensor,
                       gallery_owner: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive (items of its owner) in the gallery.

    Ties count against the query: the rank is the number of NEGATIVE gallery items whose score
    is >= the best positive's score. A query whose row holds any non-finite score, or that has
    no positive in the gallery, gets rank len(gallery), one past the last place: a miss at every
    K up to the gallery size.

    Scores are fp32 with autocast off even inside a caller's `torch.autocast`: bf16 or fp16
    would round near-ties together and flip the order of close items. Works in query chunks so
    only a (chunk, N_gallery) score block is ever held in memory.
    """
    gallery_t = gallery.float().t()
    ranks = []
    with torch.autocast(gallery.device.type, enabled=False):
        for start in range(0, query.shape[0], chunk):
            scores = query[start:start + chunk].float() @ gallery_t
            positive = query_owner[start:start + chunk, None] == gallery_owner[None, :]
            best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
            rank = ((scores >= best) & ~positive).sum(dim=1)
            scorable = torch.isfinite(scores).all(dim=1) & positive.any(dim=1)
            ranks.append(torch.where(scorable, rank, torch.full_like(rank, gallery.shape[0])))
    return torch.cat(ranks)


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, query_owner: torch.Tensor,
                gallery_owner: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Recall@K in percent for each K, over the queries with at least one positive in the gallery.

    A query without a positive (say an image none of whose captions has a spoken version) is
    left out of the denominator: no ranking could find it, so it says nothing about the model.
    """
    covered = torch.isin(query_owner, gallery_owner)
    if not bool(covered.any()):
        raise ValueError("no query has a positive item in the gallery")
    ranks = best_positive_rank(query[covered], gallery, query_owner[covered], gallery_owner)
    return {k: 100.0 * int((ranks < k).sum()) / len(ranks) for k in ks}


Recall = Callable[..., dict[int, float]]  # recall_at_k's signature


def _recall_if_scorable(emb: dict[str, torch.Tensor], owner: dict[str, torch.Tensor], q: str,
                        g: str, ks: tuple[int, ...], recall: Recall) -> dict[int, float]:
    """`recall` from modality q to modality g, or {} when the pair cannot be scored."""
    if any(m not in emb or m not in owner or len(emb[m]) == 0 for m in (q, g)):
        return {}
    if not bool(torch.isin(owner[q], owner[g]).any()):
        return {}
    return recall(emb[q], emb[g], owner[q], owner[g], ks)


def retrieval_metrics(emb: dict[str, torch.Tensor], owner: dict[str, torch.Tensor],
                      ks: tuple[int, ...] = KS,
                      caption_rows: dict[str, torch.Tensor] | None = None,
                      recall: Recall = recall_at_k) -> dict[str, float]:
    """All directions between the modalities present in `emb`, as `i2t_r1`, ..., plus `mean_r1`.

    `emb[m]` holds L2-normalised embeddings of modality m ("image", "text", "audio") and
    `owner[m]` the image index each row belongs to (for images: the image itself). A direction
    is left out when a modality is missing or none of its queries has a positive; `mean_r1` is
    the mean R@1 of the six image-level directions present.

    With `caption_rows` (the caption row of each "text" and "audio" embedding), the strict
    caption-level `t2a_own_rK` and `a2t_own_rK` are added too, where a caption's only positive
    is its own reading and vice versa; they are not part of `mean_r1`. `recall` scores one
    direction (nlmm.eval.faiss_recall.gallery_recall for large galleries).
    """
    out: dict[str, float] = {}
    for direction in DIRECTIONS:
        q, g = _MODALITY[direction[0]], _MODALITY[direction[2]]
        for k, value in _recall_if_scorable(emb, owner, q, g, ks, recall).items():
            out[f"{direction}_r{k}"] = value
    r1 = [out[f"{d}_r1"] for d in DIRECTIONS if f"{d}_r1" in out]
    if r1:
        out["mean_r1"] = sum(r1) / len(r1)
    if caption_rows is not None:
        for direction in OWN_DIRECTIONS:
            q, g = _MODALITY[direction[0]], _MODALITY[direction[2]]
            for k, value in _recall_if_scorable(emb, caption_rows, q, g, ks, recall).items():
                out[f"{direction}_r{k}"] = value
    return out
