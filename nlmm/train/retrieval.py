"""Recall@K for cross-modal retrieval under the multi-caption protocol (REFERENCE.md).

A query is a hit at K when ANY gallery item that belongs to the same image ranks in the top K.
Counting only the diagonal as positive would treat an image's other four captions as negatives
and understate recall, a mistake several public tools make.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
_MODALITY = {"i": "image", "t": "text", "a": "audio"}


def best_positive_rank(query: torch.Tensor, gallery: torch.Tensor, query_owner: torch.Tensor,
                       gallery_owner: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive (items of its image) in the gallery.

    Works in query chunks so only a (chunk, N_gallery) score block is ever held in memory.
    Ties count in the query's favour (only strictly higher scores push the positive down).
    """
    gallery_t = gallery.t()
    ranks = []
    for start in range(0, query.shape[0], chunk):
        scores = query[start:start + chunk].float() @ gallery_t.float()
        positive = query_owner[start:start + chunk, None] == gallery_owner[None, :]
        if not bool(positive.any(dim=1).all()):
            raise ValueError("every query needs at least one positive item in the gallery")
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append((scores > best).sum(dim=1))
    return torch.cat(ranks)


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, query_owner: torch.Tensor,
                gallery_owner: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Recall@K in percent for each K."""
    ranks = best_positive_rank(query, gallery, query_owner, gallery_owner)
    return {k: 100.0 * int((ranks < k).sum()) / len(ranks) for k in ks}


def retrieval_metrics(emb: dict[str, torch.Tensor], owner: dict[str, torch.Tensor],
                      ks: tuple[int, ...] = KS) -> dict[str, float]:
    """All directions between the modalities present in `emb`, as `i2t_r1`, ..., plus `mean_r1`.

    `emb[m]` holds L2-normalised embeddings of modality m ("image", "text", "audio") and
    `owner[m]` the image index each row belongs to (for images: the image itself).
    """
    out: dict[str, float] = {}
    for direction in DIRECTIONS:
        q, g = _MODALITY[direction[0]], _MODALITY[direction[2]]
        if q not in emb or g not in emb or len(emb[q]) == 0 or len(emb[g]) == 0:
            continue
        for k, value in recall_at_k(emb[q], emb[g], owner[q], owner[g], ks).items():
            out[f"{direction}_r{k}"] = value
    r1 = [v for key, v in out.items() if key.endswith("_r1")]
    if r1:
        out["mean_r1"] = sum(r1) / len(r1)
    return out
