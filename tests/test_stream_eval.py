"""Evaluation and search of a streamed run: faiss scores a large gallery with the exact
scorer's figures, evaluate_packed gives the same metrics through either, and a pack's search
gallery rows line up with the embeddings iter_split feeds it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nlmm.data.packed import pack
from nlmm.data.stream import iter_split
from nlmm.eval import faiss_recall
from nlmm.eval.evaluate import evaluate_packed
from nlmm.eval.recall import recall_at_k
from nlmm.model import NLMM
from nlmm.search.pack import read_items

sys.path.insert(0, str(Path(__file__).parent))
from test_packed import CFG, CHUNK, VOCAB, tiny_corpus  # noqa: E402
from tiny import TINY_DATA, tiny_config  # noqa: E402

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'nlmm[faiss]')")


@pytest.fixture(autouse=True)
def pack_cache(tmp_path, monkeypatch) -> None:
    """Remote chunks and sha256 memos of each test in its own folder, never in ~/.cache."""
    monkeypatch.setenv("NLMM_PACK_CACHE", str(tmp_path / "pack-cache"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "p"
    pack(tiny_corpus(tmp_path_factory.mktemp("corpus")), out, vocab_size=VOCAB, data_cfg=CFG,
         chunk_bytes=CHUNK, workers=1, progress=False)
    return out


def embeddings(n_images: int, captions: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, 16, generator=g), dim=1)
    owner = torch.arange(n_images).repeat_interleave(captions)
    texts = images[owner] + noise * torch.randn(len(owner), 16, generator=g)
    return images, torch.nn.functional.normalize(texts, dim=1), owner


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_faiss_recall_equals_the_exact_scorer_both_ways(noise: float) -> None:
    images, texts, owner = embeddings(400, 5, noise)
    ids = torch.arange(400)
    for args in ((images, texts, ids, owner), (texts, images, owner, ids)):
        assert faiss_recall.faiss_recall_at_k(*args) == recall_at_k(*args)
    # a query without a positive is left out; a gallery smaller than the list is fine
    assert faiss_recall.faiss_recall_at_k(images[:8], texts[:20], torch.arange(8) + 2,
                                          owner[:20]) == \
        recall_at_k(images[:8], texts[:20], torch.arange(8) + 2, owner[:20])


def test_faiss_recall_keeps_the_exact_scorers_safeguards() -> None:
    collapsed = torch.ones(50, 8) / 8 ** 0.5  # every score ties: a broken model scores 0
    ids = torch.arange(50)
    assert faiss_recall.faiss_recall_at_k(collapsed, collapsed, ids, ids) == \
        recall_at_k(collapsed, collapsed, ids, ids) == {1: 0.0, 5: 0.0, 10: 0.0}
    images, texts, owner = embeddings(50, 1, 0.1)
    images[3] = float("nan")  # that query misses, the others are scored as usual
    assert faiss_recall.faiss_recall_at_k(images, texts, ids, owner) == \
        recall_at_k(images, texts, ids, owner)
    texts[7] = float("inf")  # a gallery row that is not finite: every query misses
    assert faiss_recall.faiss_recall_at_k(images, texts, ids, owner)[10] == 0.0


def test_evaluate_packed_gives_the_same_figures_through_faiss(packed, monkeypatch) -> None:
    cfg = tiny_config(*TINY_DATA, f"vocab_size={VOCAB}")
    torch.manual_seed(0)
    model = NLMM(cfg).eval()
    args = (model, str(packed), "train", torch.device("cpu"), CFG, None)
    exact = evaluate_packed(*args)
    calls = []
    real = faiss_recall.faiss_recall_at_k
    monkeypatch.setattr(faiss_recall, "FAISS_MIN_GALLERY", 1)
    monkeypatch.setattr(faiss_recall, "faiss_recall_at_k",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert evaluate_packed(*args) == exact and len(calls) >= 6  # i2t, t2i, ... and own


def test_search_gallery_rows_line_up_with_the_streamed_embeddings(packed) -> None:
    batches = list(iter_split(packed, "dev", batch_size=4, data_cfg=CFG))
    streamed = {
        "image": [i for b in batches for i in b["image_ids"][b["has_image"]].tolist()],
        "text": [c for b in batches for c in b["caption_ids"].tolist()],
        "audio": [c for b in batches for c in b["caption_ids"][b["has_audio"]].tolist()]}
    for modality, rows in streamed.items():
        items = read_items(str(packed), "dev", modality)
        assert items.rows.tolist() == rows and len(items.groups) == len(rows)
    images = read_items(str(packed), "dev", "image")
    assert images.groups == [b for batch in batches for b in batch["group_id"]]
