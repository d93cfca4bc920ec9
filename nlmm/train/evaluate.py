"""Embed a split of the prepared cache and score it with the multi-caption Recall@K protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nlmm.data.cache import PreparedCache
from nlmm.data.loader import iter_modality, owner_images
from nlmm.model import NLMM
from nlmm.train.retrieval import retrieval_metrics

MODALITIES = ("image", "text", "audio")


def embed_split(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                modalities: tuple[str, ...] = MODALITIES, batch_size: int = 128,
                ttt: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Embeddings (on `device`) and owning image rows of every item of `split`."""
    model.eval()
    emb: dict[str, torch.Tensor] = {}
    owner: dict[str, torch.Tensor] = {}
    for modality in modalities:
        owners = owner_images(cache, split, modality)
        if len(owners) == 0:
            continue
        chunks = []
        for x, mask, _rows in iter_modality(cache, split, modality, batch_size, device):
            if ttt:
                chunks.append(model.encode_ttt(modality, x, mask).detach())
            else:
                with torch.no_grad():
                    chunks.append(model.encode(modality, x, mask))
        emb[modality] = torch.cat(chunks).float()
        owner[modality] = torch.as_tensor(owners, device=device)
    return emb, owner


def evaluate_split(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                   ttt: bool = False) -> dict[str, float]:
    """The 18 Recall@K figures (R@1/5/10 in the six directions) plus `mean_r1`, in percent."""
    emb, owner = embed_split(model, cache, split, device, ttt=ttt)
    return retrieval_metrics(emb, owner)


def evaluate_target(target: str, split: str = "test", ttt: bool = False, device: str = "auto",
                    data: Path | None = None) -> dict[str, Any]:
    """`nlmm eval`: load a run's best checkpoint (or a checkpoint file) and score a split."""
    from nlmm.inference import load_for_inference, require_cache

    loaded = load_for_inference(target, device=device, data=data)
    cache = require_cache(loaded)
    results: dict[str, Any] = {"checkpoint": str(loaded.checkpoint_path), "split": split,
                               "metrics": evaluate_split(loaded.model, cache, split, loaded.device)}
    if ttt:
        results["metrics_ttt"] = evaluate_split(loaded.model, cache, split, loaded.device, ttt=True)
    return results
