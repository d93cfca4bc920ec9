"""evaluate_split on a split where some images have no spoken caption: coverage counts, strict
caption-level speech figures paired through the cache's caption rows."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_retrieval import partly_spoken_set

from nlmm.eval.evaluate import embed_split, evaluate_split, score_split


class RowsOnlyCache:
    """The split lookups score_split needs: image rows 0-2, caption rows 10-14, readings 10-12."""

    own_audio = np.ones(15, dtype=bool)  # every reading is its caption's own (FACC)

    def split_images(self, split: str, source: int | None = None) -> np.ndarray:
        return np.arange(3)

    def split_captions(self, split: str, source: int | None = None) -> np.ndarray:
        return np.arange(10, 15)

    def split_audio_captions(self, split: str, source: int | None = None) -> np.ndarray:
        return np.array([10, 11, 12])


def test_score_split_pairs_captions_and_readings_by_caption_row():
    emb, owner, rows = partly_spoken_set()
    got = score_split(RowsOnlyCache(), "test", emb, owner)
    assert (got["n_images"], got["n_captions"], got["n_wavs"]) == (3, 5, 3)
    assert got["t2a_r1"] == 75.0 and got["a2t_r1"] == 100.0
    assert abs(got["t2a_own_r1"] - 100.0 / 3) < 1e-9 and abs(got["a2t_own_r1"] - 100.0 / 3) < 1e-9
    r1 = [got[f"{d}_r1"] for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")]
    assert got["mean_r1"] == sum(r1) / 6


class CollapsedModel:
    """Every item gets the same embedding: all scores tie, so ranks are counts of negatives."""

    def eval(self) -> CollapsedModel:
        return self

    def encode(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.full((x.shape[0], 4), 0.5)


def test_evaluate_split_scores_an_image_without_audio_out_of_the_speech_directions(tiny_cache):
    cache = copy.copy(tiny_cache)
    images = cache.split_images("test")
    captions = cache.split_captions("test")
    silent = captions[cache.caption_image(captions) == images[0]]
    cache.mel_lengths = cache.mel_lengths.copy()
    cache.mel_lengths[silent] = 0  # the first test image's captions were never read aloud

    got = evaluate_split(CollapsedModel(), cache, "test", torch.device("cpu"))

    assert len(images) == 3 and len(captions) == 15 and len(silent) == 5
    assert (got["n_images"], got["n_captions"], got["n_wavs"]) == (3, 15, 10)
    # a covered image ties with its own 5 readings and the other image's 5, which rank above
    # them: R@5 misses, R@10 hits. Counting the silent image as a miss would give R@10 = 66.7.
    assert got["i2a_r5"] == 0.0 and got["i2a_r10"] == 100.0
    for key in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t", "t2a_own", "a2t_own"):
        assert f"{key}_r1" in got, key


class ContentModel:
    """Embeds an item by the sum of its input, so that every item keeps its own embedding."""

    cfg = SimpleNamespace(embed_dim=4)

    def eval(self) -> ContentModel:
        return self

    def encode(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).float().sum(1, keepdim=True).expand(-1, 4)


@pytest.mark.parametrize("parts", [2, 3, 7])  # 7: more ranks than batches, some shares empty
def test_the_shares_of_a_split_concatenate_to_the_whole_split(tiny_cache, parts):
    """The data-parallel evaluation embeds one share per rank and joins them in rank order."""
    device = torch.device("cpu")
    whole, owner = embed_split(ContentModel(), tiny_cache, "test", device, batch_size=4)
    shares = [embed_split(ContentModel(), tiny_cache, "test", device, batch_size=4, part=part,
                          parts=parts) for part in range(parts)]
    assert set(whole) == {"image", "text", "audio"}
    for modality, emb in whole.items():
        assert torch.equal(torch.cat([share[modality] for share, _ in shares]), emb)
        assert all(torch.equal(share_owner[modality], owner[modality]) for _, share_owner in shares)
