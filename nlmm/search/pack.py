"""The search gallery of a model trained from a pack (a streamed run): its pack's split read
instead of a prepared cache, so `nlmm search` needs no --data for such a run.

Gallery rows are the pack's dense indices (an image's group, a caption's index), the ones
nlmm.data.stream puts in image_ids and caption_ids, so a hit is looked up by its row alone. What a
hit shows (the group's id, a caption) comes from one pass over the split's samples that decodes
no image and no log-mel; it is saved beside the gallery's embeddings, so a later search of the
same pack reads neither. Embeddings come from nlmm.data.stream.iter_split, batch after batch:
memory holds a batch and the embeddings, never the split's pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlmm.data.corpora.base import SPLITS
from nlmm.data.pack_block import caption_readings
from nlmm.data.pack_index import read_manifest
from nlmm.data.pack_reader import ShardReader, split_shards
from nlmm.data.stream import iter_split
from nlmm.data.stream_order import SplitOrder
from nlmm.search.types import SearchHit

ENCODE_BATCH = 64  # groups per batch; a batch holds their images and every caption's log-mel


@dataclass
class PackItems:
    """The rows of one modality of a split and, per row, what a hit shows."""

    rows: np.ndarray  # dense group index (images) or caption index (text, audio)
    groups: list[str]  # the corpus's id of the row's group
    captions: list[str]  # the row's caption (an image: its group's first caption)


def read_items(url: str, split: str, modality: str) -> PackItems:
    """The gallery rows of `modality` in `split`, in the order iter_split serves them: groups
    with an image; every caption; captions with audio (their own reading, or the first caption
    of a group with a clip)."""
    manifest = read_manifest(url)
    if manifest["splits"].get(split, {}).get("groups", 0) == 0:
        return PackItems(np.zeros(0, dtype=np.int64), [], [])
    shards = split_shards(manifest, split)
    reader = ShardReader(url, split, shards, manifest["fingerprint"])
    order = SplitOrder([s.samples for s in shards], 256)
    rows, groups, captions = [], [], []
    for step in range(order.steps):
        for sample in reader.read(order.rows(step)):
            texts = json.loads(sample["captions"])
            if modality == "image":
                if len(sample["image"]):
                    rows.append(sample["group"])
                    groups.append(sample["group_id"])
                    captions.append(texts[0])
                continue
            readings = caption_readings(sample)
            for k, text in enumerate(texts):
                if modality == "text" or readings[k].shape[1] or (
                        k == 0 and sample["clip"].shape[1]):
                    rows.append(sample["caption_base"] + k)
                    groups.append(sample["group_id"])
                    captions.append(text)
    return PackItems(np.asarray(rows, dtype=np.int64), groups, captions)


class PackGallery:
    """The gallery of a streamed run's pack, for nlmm.search.engine.Searcher."""

    def __init__(self, url: str, index_dir: Path, data_cfg: Any, tokenizer: Any) -> None:
        self.url, self.index_dir = url, index_dir
        self.data_cfg, self.tokenizer = data_cfg, tokenizer
        self.key = str(read_manifest(url)["fingerprint"])[:16]
        self._read: dict[tuple[str, str], PackItems] = {}  # by (split, modality)
        self._by_row: dict[tuple[str, int], tuple[str, str]] = {}  # (modality, row) -> shown

    def rows(self, split: str, modality: str) -> np.ndarray:
        """Dense indices of the gallery, in index order (for `all`: train, dev, test)."""
        parts = [self._items(s, modality) for s in (SPLITS if split == "all" else (split,))]
        return np.concatenate([p.rows for p in parts])

    def _items(self, split: str, modality: str) -> PackItems:
        if (split, modality) in self._read:
            return self._read[split, modality]
        path = self.index_dir / f"{modality}-{split}-pack-{self.key}.json"
        try:
            saved = json.loads(path.read_text())
            items = PackItems(np.asarray(saved["rows"], dtype=np.int64), saved["groups"],
                              saved["captions"])
        except (OSError, ValueError, KeyError):
            items = read_items(self.url, split, modality)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"rows": items.rows.tolist(), "groups": items.groups,
                                       "captions": items.captions}))
            os.replace(tmp, path)
        for row, group, caption in zip(items.rows.tolist(), items.groups, items.captions,
                                       strict=True):
            self._by_row[modality, row] = (group, caption)
        self._read[split, modality] = items
        return items

    def embed_into(self, out: np.ndarray, split: str, modality: str,
                   encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                   advance: Callable[[int], None]) -> None:
        """The gallery's embeddings, in `rows` order, into `out`."""
        filled = 0
        for s in SPLITS if split == "all" else (split,):
            if self.rows(s, modality).size == 0:
                continue
            for batch in iter_split(self.url, s, batch_size=ENCODE_BATCH,
                                    data_cfg=self.data_cfg, tokenizer=self.tokenizer):
                x, mask = _modality_input(batch, modality)
                if x is None:
                    continue
                out[filled:filled + len(x)] = encode(x, mask).float().cpu().numpy()
                filled += len(x)
                advance(len(x))

    def hit(self, rank: int, score: float, modality: str, row: int) -> SearchHit:
        group, caption = self._by_row[modality, row]
        item = group if modality == "image" else caption if modality == "text" else \
            f"{group} caption {row} (spoken)"
        return SearchHit(rank, score, modality, item, caption, None, group)


def _modality_input(batch: dict[str, Any], modality: str
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rows of one modality of an iter_split batch, as the model's encode takes them."""
    if modality == "text":
        return batch["text"], batch["text_mask"]
    rows = batch["has_image"] if modality == "image" else batch["has_audio"]
    if not bool(rows.any()):
        return None, None
    if modality == "image":
        return batch["image"][rows], None
    mask = batch["audio_mask"][rows]
    width = int(mask.any(dim=0).nonzero().max()) + 1  # trim the batch's padding
    return batch["audio"][rows][..., :width], mask[:, :width]
