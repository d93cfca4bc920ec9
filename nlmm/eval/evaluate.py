"""Embed a split of the prepared cache and score it with the multi-caption Recall@K protocol."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nlmm.config import MODALITIES
from nlmm.data.cache import PreparedCache
from nlmm.data.loader import iter_modality, modality_rows, owner_images
from nlmm.errors import NlmmError
from nlmm.model import NLMM
from nlmm.eval.recall import retrieval_metrics

# Keys of the coverage counts, so a partly covered split shows on how many items it was scored.
COVERAGE_KEYS = {"image": "n_images", "text": "n_captions", "audio": "n_wavs"}


def embed_split(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                modalities: tuple[str, ...] | None = None, batch_size: int = 128,
                ttt: bool = False, part: int = 0, parts: int = 1,
                source: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Embeddings (on `device`) and owning group rows of every item of `split` (of one corpus of
    a mixture with `source`), for the modalities the model has (or `modalities`).

    With `parts` > 1 only share `part` (0-based) of each modality's batches is embedded, a
    contiguous run of them that may be empty, while the owners still cover the whole split:
    the data-parallel evaluation embeds one share per rank and concatenates them in rank order.
    """
    model.eval()
    emb: dict[str, torch.Tensor] = {}
    owner: dict[str, torch.Tensor] = {}
    for modality in modalities or getattr(model, "modalities", MODALITIES):
        owners = owner_images(cache, split, modality, source)
        if len(owners) == 0:
            continue
        batches = math.ceil(len(owners) / batch_size)
        first, stop = part * batches // parts, (part + 1) * batches // parts
        chunks = []
        for index, (x, mask, _rows) in enumerate(iter_modality(cache, split, modality,
                                                               batch_size, device, source)):
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
                owner: dict[str, torch.Tensor], source: int | None = None) -> dict[str, float]:
    """`retrieval_metrics` of a split's embeddings (as embed_split returns them) with the strict
    caption-level speech figures (spoken-caption corpora only) and the coverage counts
    `n_images`, `n_captions`, `n_wavs`."""
    # text and audio rows are both caption rows, so equal rows pair a caption with its reading;
    # a clip described by several captions is no caption's own reading
    audio_rows = modality_rows(cache, split, "audio", source) if "audio" in owner else None
    own = audio_rows is not None and len(audio_rows) > 0 and bool(cache.own_audio[audio_rows].all())
    caption_rows = {m: torch.as_tensor(modality_rows(cache, split, m, source), dtype=torch.int64,
                                       device=owner[m].device)
                    for m in ("text", "audio") if m in owner} if own else None
    metrics = retrieval_metrics(emb, owner, caption_rows=caption_rows)
    for modality, key in COVERAGE_KEYS.items():
        metrics[key] = float(len(emb[modality])) if modality in emb else 0.0
    return metrics


def evaluate_split(model: NLMM, cache: PreparedCache, split: str, device: torch.device,
                   ttt: bool = False, source: int | None = None) -> dict[str, float]:
    """Recall@K in percent (R@1/5/10 in every direction the model and corpus have, `mean_r1`,
    the strict `t2a_own_rK` and `a2t_own_rK` for spoken captions) and the coverage counts
    `n_images`, `n_captions`, `n_wavs`.

    Each direction is scored over the queries with at least one positive in the gallery: an
    image none of whose captions was spoken, for instance, is left out of i2a's denominator.
    """
    emb, owner = embed_split(model, cache, split, device, ttt=ttt, source=source)
    return score_split(cache, split, emb, owner, source)


def evaluate_packed(model: NLMM, url: str, split: str, device: torch.device, data_cfg: Any,
                    tokenizer: Any, batch_size: int = 32) -> dict[str, float]:
    """`evaluate_split` of a packed split, streamed: embeddings are computed chunk by chunk
    (memory holds embeddings, never the split's pixels or audio), then scored as a prepared
    cache's: exactly, or through faiss for a gallery of FAISS_MIN_GALLERY items or more (the
    same figures, faiss_recall.py). A group's clip is one audio item; spoken captions keep the
    strict caption-level directions."""
    from nlmm.data.stream import iter_split
    from nlmm.eval.faiss_recall import gallery_recall

    model.eval()
    towers = getattr(model, "modalities", MODALITIES)
    emb: dict[str, list[torch.Tensor]] = {m: [] for m in towers}
    owner: dict[str, list[torch.Tensor]] = {m: [] for m in towers}
    audio_caption, text_caption, all_own = [], [], True

    def encode(modality: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(modality, x.to(device), None if mask is None else mask.to(device))

    for batch in iter_split(url, split, batch_size=batch_size, data_cfg=data_cfg,
                            tokenizer=tokenizer):
        if "image" in towers and bool(batch["has_image"].any()):
            rows = batch["has_image"]
            emb["image"].append(encode("image", batch["image"][rows], None))
            owner["image"].append(batch["image_ids"][rows])
        if "text" in towers:
            emb["text"].append(encode("text", batch["text"], batch["text_mask"]))
            owner["text"].append(batch["caption_group"])
            text_caption.append(batch["caption_ids"])
        if "audio" in towers and bool(batch["has_audio"].any()):
            rows = batch["has_audio"]
            mask = batch["audio_mask"][rows]
            width = int(mask.any(dim=0).nonzero().max()) + 1  # trim the batch's padding
            emb["audio"].append(encode("audio", batch["audio"][rows][..., :width],
                                       mask[:, :width]))
            owner["audio"].append(batch["caption_group"][rows])
            audio_caption.append(batch["caption_ids"][rows])
            all_own = all_own and bool(batch["own_audio"][rows].all())
    emb_t = {m: torch.cat(v).float() for m, v in emb.items() if v}
    owner_t = {m: torch.cat(v).to(device) for m, v in owner.items() if v}
    caption_rows = None
    if "audio" in emb_t and all_own and text_caption:
        caption_rows = {"text": torch.cat(text_caption).to(device),
                        "audio": torch.cat(audio_caption).to(device)}
    metrics = retrieval_metrics(emb_t, owner_t, caption_rows=caption_rows, recall=gallery_recall)
    for modality, key in COVERAGE_KEYS.items():
        metrics[key] = float(len(emb_t[modality])) if modality in emb_t else 0.0
    return metrics


# The test protocols of the retrieval literature: (folds of N groups, or None for the whole
# split, the split's expected number of images). Karpathy's Flickr8k/30k test has 1000
# images, COCO's 5000 (scored whole, "5K", or as 5 folds of 1000 averaged, "1K").
PROTOCOLS: dict[str, tuple[int | None, int | None]] = {
    "test": (None, None), "karpathy-1k": (None, 1000), "coco-5k": (None, 5000),
    "coco-1k": (1000, 5000)}


def _fold_metrics(emb: dict[str, torch.Tensor], owner: dict[str, torch.Tensor],
                  groups: torch.Tensor) -> dict[str, float]:
    """Recall of a fold: only the items whose group is among `groups`."""
    sub_emb, sub_owner = {}, {}
    for m in emb:
        keep = torch.isin(owner[m], groups)
        sub_emb[m], sub_owner[m] = emb[m][keep], owner[m][keep]
    metrics = retrieval_metrics(sub_emb, sub_owner)
    for modality, key in COVERAGE_KEYS.items():
        metrics[key] = float(len(sub_emb[modality])) if modality in sub_emb else 0.0
    return metrics


def evaluate_protocol(model: NLMM, cache: PreparedCache, protocol: str, device: torch.device,
                      ttt: bool = False, source: int | None = None
                      ) -> tuple[dict[str, float], list[str]]:
    """Metrics of a test protocol (PROTOCOLS) and warnings when the split does not have the size
    the protocol's papers scored (a partial download, another split file)."""
    if protocol not in PROTOCOLS:
        raise NlmmError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    fold, expected = PROTOCOLS[protocol]
    warnings = []
    n_groups = len(cache.split_groups("test", source))
    if expected is not None and n_groups != expected:
        warnings.append(f"{protocol} scores {expected} test images, but this test split has "
                        f"{n_groups}: the figures are not comparable with published ones.")
    if fold is None:
        return evaluate_split(model, cache, "test", device, ttt=ttt, source=source), warnings
    emb, owner = embed_split(model, cache, "test", device, ttt=ttt, source=source)
    groups = torch.as_tensor(cache.split_groups("test", source), device=device)
    folds = [_fold_metrics(emb, owner, groups[i * fold:(i + 1) * fold])
             for i in range(max(1, len(groups) // fold))]
    keys = set.intersection(*(set(f) for f in folds))
    return {k: sum(f[k] for f in folds) / len(folds) for k in sorted(keys)}, warnings


def evaluate_target(target: str, split: str = "test", ttt: bool | None = None,
                    device: str = "auto", data: list | Path | None = None,
                    protocol: str | None = None) -> dict[str, Any]:
    """`nlmm eval`: load a run's best checkpoint (or a checkpoint file) and score a split, or
    the test split under a literature `protocol` (PROTOCOLS).

    The coverage counts of evaluate_split come under "coverage", the figures under "metrics"
    (plain embeddings, always) and "metrics_ttt" (after test-time training, when it is used).
    `ttt` None uses TTT when the checkpoint's config has `ttt.enable`; True / False force it.
    "ttt" says whether it was used, and "ttt_settings" with which eta / max_steps / rank. A
    cache of several corpora adds "sources": each corpus's own figures on the same split.
    """
    from nlmm.data.pack_source import is_pack
    from nlmm.inference.load import load_for_inference, require_cache, training_pack

    named = [str(getattr(d, "path", d)) for d in (data if isinstance(data, list) else [data])
             if d is not None]
    packs = [d for d in named if is_pack(d)]
    if packs and len(named) > 1:
        raise NlmmError(f"--data names the pack {packs[0]} beside other corpora; score a pack "
                        f"on its own, with one --data.")
    # a pack is read as it is (its features were made at pack time), not prepared
    loaded = load_for_inference(target, device=device, data=None if packs else data)
    pack = packs[0] if packs else training_pack(loaded) if data is None else None
    if pack is not None:
        if protocol is not None or ttt:
            raise NlmmError("a pack is scored on its split as it is; pass --data with the "
                            "corpus it was packed from for --protocol or --ttt.")
        metrics = evaluate_packed(loaded.model, pack, split, loaded.device, loaded.cfg.data,
                                  loaded.tokenizer)
        coverage = {key: int(metrics.pop(key)) for key in COVERAGE_KEYS.values()}
        return {"checkpoint": str(loaded.checkpoint_path), "split": split, "coverage": coverage,
                "metrics": metrics, "modalities": list(loaded.model.modalities), "ttt": False,
                "pack": pack}
    cache = require_cache(loaded)
    use_ttt = loaded.cfg.ttt.enable if ttt is None else bool(ttt)

    def score(source: int | None, with_ttt: bool) -> tuple[dict[str, float], list[str]]:
        if protocol is not None:
            return evaluate_protocol(loaded.model, cache, protocol, loaded.device, with_ttt,
                                     source)
        return evaluate_split(loaded.model, cache, split, loaded.device, with_ttt, source), []

    metrics, warnings = score(None, False)
    # counts get their own entry so that every value under "metrics" is a percentage
    coverage = {key: int(metrics.pop(key)) for key in COVERAGE_KEYS.values()}
    results: dict[str, Any] = {"checkpoint": str(loaded.checkpoint_path),
                               "split": "test" if protocol else split, "coverage": coverage,
                               "metrics": metrics, "modalities": list(loaded.model.modalities)}
    if protocol is not None:
        results["protocol"] = protocol
    if warnings:
        results["warnings"] = warnings
    results["ttt"] = use_ttt
    if use_ttt:
        t = loaded.cfg.ttt
        results["ttt_settings"] = {"eta": t.eta, "max_steps": t.max_steps,
                                   "adapter_rank": t.adapter_rank}
        metrics_ttt, _ = score(None, True)
        results["metrics_ttt"] = {k: v for k, v in metrics_ttt.items() if k not in coverage}
    if len(cache.sources) > 1:
        results["sources"] = []
        for i, src in enumerate(cache.sources):
            m, w = score(i, False)
            results["sources"].append({"path": src["path"], "format": src["format"],
                                       "coverage": {k: int(m.pop(k)) for k in COVERAGE_KEYS.values()},
                                       "metrics": m, **({"warnings": w} if w else {})})
    return results
