"""Embed a split of the prepared cache and score it with the multi-caption Recall@K protocol."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nlmm.config import MODALITIES
from nlmm.data.cache import PreparedCache
from nlmm.data.loader import iter_modality, modality_rows, owner_images
from nlmm.model import NLMM
from nlmm.train.retrieval import retrieval_metrics

# Keys of the coverage counts, so a partly covered split shows on how many items it was scored.
COVERAGE_KEYS = {"image": "n_images", "text": "n_captions", "audio": "n_wavs"}


def embed_split(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                modalities: tuple[str, ...] = MODALITIES, batch_size: int = 128,
                ttt: bool = False, part: int = 0,
                parts: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Embeddings (on `device`) and owning image rows of every item of `split`.

    With `parts` > 1 only share `part` (0-based) of each modality's batches is embedded, a
    contiguous run of them that may be empty, while the owners still cover the whole split:
    the data-parallel evaluation embeds one share per rank and concatenates them in rank order.
    """
    model.eval()
    emb: dict[str, torch.Tensor] = {}
    owner: dict[str, torch.Tensor] = {}
    for modality in modalities:
        owners = owner_images(cache, split, modality)
        if len(owners) == 0:
            continue
        batches = math.ceil(len(owners) / batch_size)
        first, stop = part * batches // parts, (part + 1) * batches // parts
        chunks = []
        for index, (x, mask, _rows) in enumerate(iter_modality(cache, split, modality,
                                                               batch_size, device)):
            if index >= stop:
                break
            if index < first:
                continue
            if ttt:
                chunks.append(model.encode_ttt(modality, x, mask,
                                               mask_id=cache.tokenizer.mask_id).detach())
            else:
                with torch.no_grad():
                    chunks.append(model.encode(modality, x, mask))
        emb[modality] = (torch.cat(chunks).float() if chunks
                         else torch.zeros(0, model.cfg.embed_dim, device=device))
        owner[modality] = torch.as_tensor(owners, device=device)
    return emb, owner


def score_split(cache: PreparedCache, split: str, emb: dict[str, torch.Tensor],
                owner: dict[str, torch.Tensor]) -> dict[str, float]:
    """`retrieval_metrics` of a split's embeddings (as embed_split returns them) with the strict
    caption-level speech figures and the coverage counts `n_images`, `n_captions`, `n_wavs`."""
    # text and audio rows are both caption rows, so equal rows pair a caption with its reading
    caption_rows = {m: torch.as_tensor(modality_rows(cache, split, m), dtype=torch.int64,
                                       device=owner[m].device)
                    for m in ("text", "audio") if m in owner}
    metrics = retrieval_metrics(emb, owner, caption_rows=caption_rows)
    for modality, key in COVERAGE_KEYS.items():
        metrics[key] = float(len(emb[modality])) if modality in emb else 0.0
    return metrics


def evaluate_split(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                   ttt: bool = False) -> dict[str, float]:
    """Recall@K in percent (R@1/5/10 in the six directions, `mean_r1`, the strict `t2a_own_rK`
    and `a2t_own_rK`) and the coverage counts `n_images`, `n_captions`, `n_wavs`.

    Each direction is scored over the queries with at least one positive in the gallery: an
    image none of whose captions was spoken, for instance, is left out of i2a's denominator.
    """
    emb, owner = embed_split(model, cache, split, device, ttt=ttt)
    return score_split(cache, split, emb, owner)


def evaluate_target(target: str, split: str = "test", ttt: bool | None = None,
                    device: str = "auto", data: Path | None = None) -> dict[str, Any]:
    """`nlmm eval`: load a run's best checkpoint (or a checkpoint file) and score a split.

    The coverage counts of evaluate_split come under "coverage", the figures under "metrics"
    (plain embeddings, always) and "metrics_ttt" (after test-time training, when it is used).
    `ttt` None uses TTT when the checkpoint's config has `ttt.enable`; True / False force it.
    "ttt" says whether it was used, and "ttt_settings" with which eta / max_steps / rank.
    """
    from nlmm.inference import load_for_inference, require_cache

    loaded = load_for_inference(target, device=device, data=data)
    cache = require_cache(loaded)
    metrics = evaluate_split(loaded.model, cache, split, loaded.device)
    # counts get their own entry so that every value under "metrics" is a percentage
    coverage = {key: int(metrics.pop(key)) for key in COVERAGE_KEYS.values()}
    results: dict[str, Any] = {"checkpoint": str(loaded.checkpoint_path), "split": split,
                               "coverage": coverage, "metrics": metrics}
    use_ttt = loaded.cfg.ttt.enable if ttt is None else bool(ttt)
    results["ttt"] = use_ttt
    if use_ttt:
        t = loaded.cfg.ttt
        results["ttt_settings"] = {"eta": t.eta, "max_steps": t.max_steps,
                                   "adapter_rank": t.adapter_rank}
        metrics_ttt = evaluate_split(loaded.model, cache, split, loaded.device, ttt=True)
        results["metrics_ttt"] = {k: v for k, v in metrics_ttt.items()
                                  if k not in coverage}
    return results
