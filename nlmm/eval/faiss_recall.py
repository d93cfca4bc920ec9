"""Recall@K of a large gallery through faiss: retrieval.recall_at_k's figures without its
(queries x gallery) score blocks.

The exact scorer ranks every query against the whole gallery, holding a (1024, N) block of
scores and masks at a time: for a gallery of millions that is gigabytes and a full sort's worth
of work per query. Recall@K needs only whether a positive is among the best K, so here faiss
(`IndexFlatIP`: exact inner products, blocked, multi-threaded) returns each query's best
max(K) + 1 items and the rank of the best positive is counted among them, with the exact
scorer's rules: ties count against the query (a tie reaching past the list is a miss), a query
whose scores are not all finite misses, and queries without a positive in the gallery are left
out. Used for galleries of at least FAISS_MIN_GALLERY items when faiss-cpu is installed
(`pip install 'nlmm[faiss]'`); below that, or without faiss, the exact scorer runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nlmm.metric_names import KS
from nlmm.eval.recall import recall_at_k

FAISS_MIN_GALLERY = 20_000  # faiss is ~2x faster from here on (bench/STREAM_NOTES.md)
SEARCH_CHUNK = 16384  # queries per faiss search call: bounds the result arrays


def faiss_module() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_recall_at_k(query: torch.Tensor, gallery: torch.Tensor, query_owner: torch.Tensor,
                      gallery_owner: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """recall_at_k's contract and figures, from faiss's top max(ks) + 1 per query."""
    faiss = faiss_module()
    if faiss is None:
        raise RuntimeError("faiss is not installed")
    covered = torch.isin(query_owner, gallery_owner)
    if not bool(covered.any()):
        raise ValueError("no query has a positive item in the gallery")
    query, query_owner = query[covered].float().cpu(), query_owner[covered].cpu()
    gallery, owners = gallery.float().cpu(), gallery_owner.cpu().numpy()
    depth = min(max(ks) + 1, len(gallery))
    finite = torch.isfinite(query).all(dim=1) & bool(torch.isfinite(gallery).all())
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(torch.nan_to_num(gallery).numpy()))
    ranks = []
    for start in range(0, len(query), SEARCH_CHUNK):
        q = np.ascontiguousarray(torch.nan_to_num(query[start:start + SEARCH_CHUNK]).numpy())
        scores, items = index.search(q, depth)
        ranks.append(_ranks(scores, owners[items], query_owner[start:start + SEARCH_CHUNK].numpy(),
                            len(gallery), whole=depth == len(gallery)))
    rank = torch.from_numpy(np.concatenate(ranks))
    rank = torch.where(finite, rank, torch.full_like(rank, len(gallery)))
    return {k: 100.0 * int((rank < k).sum()) / len(rank) for k in ks}


def _ranks(scores: np.ndarray, item_owner: np.ndarray, query_owner: np.ndarray, misses: int,
           whole: bool) -> np.ndarray:
    """Per query, the number of negatives scoring >= its best listed positive, or `misses`
    when no positive is listed or a tie with it may reach past the list (unless the list is
    the `whole` gallery)."""
    positive = item_owner == query_owner[:, None]
    listed = positive.any(axis=1)
    best = np.where(listed, scores[np.arange(len(scores)), positive.argmax(axis=1)], np.inf)
    rank = ((scores >= best[:, None]) & ~positive).sum(axis=1)
    unsure = (scores[:, -1] >= best) & (not whole)
    return np.where(listed & ~unsure, rank, misses).astype(np.int64)


def gallery_recall(query: torch.Tensor, gallery: torch.Tensor, query_owner: torch.Tensor,
                   gallery_owner: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """faiss_recall_at_k for a gallery of FAISS_MIN_GALLERY items or more when faiss is
    installed, else recall_at_k."""
    if len(gallery) >= FAISS_MIN_GALLERY and faiss_module() is not None:
        return faiss_recall_at_k(query, gallery, query_owner, gallery_owner, ks)
    return recall_at_k(query, gallery, query_owner, gallery_owner, ks)
