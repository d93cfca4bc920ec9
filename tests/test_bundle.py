"""`nlmm.load_bundle`: an exported bundle embeds texts, image files and WAVs as `nlmm search`
does, so ranking a gallery's files with the bundle gives `nlmm search`'s top 5 and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import nlmm
from nlmm.inference.bundle import Bundle
from nlmm.config import resolve_config
from nlmm.data.cache import PreparedCache
from nlmm.data.corpora.base import SPLITS
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError
from nlmm.inference.export import export_bundle
from nlmm.model import NLMM
from nlmm.search.engine import SearchRequest, Searcher
from nlmm.search.types import SearchResults
from nlmm.inference.checkpoint import save_checkpoint
from nlmm.train.loop import Trainer

# For the hand-written corpus of conftest (13 images of 64x48 px, clips of 0.5-0.7 s). The
# LayerScale gains start at 0.5, not 0: two steps do not open the blocks, and a test that
# batches masked items must see them (attention, memory reads) take part.
TINY = ["d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2", "depth={text: 1, image: 1, audio: 1}",
        "vocab_size=300", "data.image_size=32", "data.max_audio_seconds=2.0",
        "data.text_max_len=16", "layer_scale_init=0.5", "train.batch_size=8", "train.epochs=1",
        "train_steps=2", "train.warmup_steps=1"]
SCORE_TOLERANCE = 1e-4


class NullSink:
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass


@dataclass
class Exported:
    checkpoint: Path
    bundle: Bundle
    cache: PreparedCache


@pytest.fixture(scope="module")
def exported(tiny_cache: PreparedCache,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    """A tiny model trained for two steps on the hand-written corpus, exported and loaded.

    The module runs torch on one thread: its matrices are too small to split, and on a busy
    2-core machine two threads wait on each other at every op (about 3x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("bundle_run")
    trainer = Trainer(resolve_config("tiny_cpu", TINY), tiny_cache, torch.device("cpu"), folder,
                      NullSink(), log=lambda m: None)
    assert trainer.fit() == "finished"
    checkpoint = folder / "checkpoints" / "best.pt"
    bundle = nlmm.load_bundle(export_bundle(str(checkpoint), folder / "bundle"))
    yield Exported(checkpoint, bundle, tiny_cache)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def searcher(exported: Exported) -> Searcher:
    return Searcher(exported.checkpoint, device="cpu")


def gallery(cache: PreparedCache, modality: str) -> tuple[list[str], list[str | Path]]:
    """(the name `nlmm search` gives each item, what the bundle embeds) for every item of
    every split, in the order `--split all` indexes them."""
    names: list[str] = []
    items: list[str | Path] = []
    for split in SPLITS:
        if modality == "image":
            rows = [int(r) for r in cache.split_images(split)]
            names += [cache.image_file(r) for r in rows]
            items += [cache.image_path(r) for r in rows]
        elif modality == "text":
            texts = [cache.caption_text(int(r)) for r in cache.split_captions(split)]
            names += texts
            items += texts
        else:
            paths = [cache.wav_path(int(r)) for r in cache.split_audio_captions(split)]
            names += [p.name for p in paths]
            items += paths
    return names, items


def bundle_scores(bundle: Bundle, query: torch.Tensor, cache: PreparedCache,
                  modality: str) -> list[tuple[str, float]]:
    """(name, score) of every gallery item for a (1, d) query, best first, the gallery embedded
    by the bundle from the corpus files themselves (not from the data cache)."""
    names, items = gallery(cache, modality)
    embed = {"image": bundle.embed_images, "text": bundle.embed_text,
             "audio": bundle.embed_audio}[modality]
    scores = (query @ embed(items).T)[0]
    order = scores.argsort(descending=True, stable=True)
    return [(names[int(i)], float(scores[i])) for i in order]


def assert_same_top5(ours: list[tuple[str, float]], theirs: list[tuple[str, float]]) -> None:
    """The same scores rank by rank, and each of their items scored the same by us: the same
    items in the same order, but for items whose scores tie (the corpus repeats a clip every 8
    images), which either may list first."""
    assert len(theirs) == 5
    np.testing.assert_allclose([s for _, s in ours[:5]], [s for _, s in theirs],
                               atol=SCORE_TOLERANCE, rtol=0)
    score_of = dict(ours)
    np.testing.assert_allclose([score_of[name] for name, _ in theirs], [s for _, s in theirs],
                               atol=SCORE_TOLERANCE, rtol=0)


def hits(results: SearchResults) -> list[tuple[str, float]]:
    return [(h.item, h.score) for h in results.hits]


def test_bundle_reproduces_the_top_5_and_scores_of_nlmm_search(exported: Exported,
                                                                searcher: Searcher,
                                                                tmp_path: Path) -> None:
    bundle, cache = exported.bundle, exported.cache
    assert bundle.modalities == ("image", "text", "audio")
    # the query image as a larger RGBA PNG, the query speech as a 44.1 kHz stereo WAV: the
    # bundle must decode, resize, resample and mix them as training and search do
    with Image.open(cache.image_path(int(cache.split_images("test")[1]))) as img:
        img.convert("RGBA").resize((img.width * 3 // 2, img.height * 3 // 2)).save(
            tmp_path / "query.png")
    wave, rate = sf.read(str(cache.wav_path(int(cache.split_audio_captions("dev")[7]))),
                         dtype="float32")
    wav = tmp_path / "query.wav"
    sf.write(wav, np.stack([1.2 * wave, 0.8 * wave], 1).repeat(2, 0), 2 * rate)
    text = cache.caption_text(int(cache.split_captions("train")[3]))

    def search(**query) -> list[tuple[str, float]]:
        """`nlmm search --split all` in this process (`run_search`, with its model loaded once)."""
        request = SearchRequest(**query, checkpoint=exported.checkpoint, split="all",
                                device="cpu")
        return hits(searcher.answer(request))

    image_query = bundle.embed_images(tmp_path / "query.png")
    assert image_query.shape == (1, 32) and image_query.dtype == torch.float32
    assert_same_top5(bundle_scores(bundle, image_query, cache, "text"),
                     search(image=tmp_path / "query.png"))
    audio_query = bundle.embed_audio([wav])
    assert_same_top5(bundle_scores(bundle, audio_query, cache, "image"), search(audio=wav))
    text_query = bundle.embed_text(text)
    assert_same_top5(bundle_scores(bundle, text_query, cache, "audio"),
                     search(text=text, target="audio"))
    for emb in (image_query, audio_query, text_query):
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))



@pytest.mark.slow
def test_bundle_reproduces_the_json_lines_of_the_search_command(exported: Exported) -> None:
    bundle, cache = exported.bundle, exported.cache
    wav = cache.wav_path(int(cache.split_audio_captions("test")[2]))
    env = dict(os.environ, COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", "nlmm.cli", "search", "--audio", str(wav),
                           "--checkpoint", str(exported.checkpoint), "--split", "all",
                           "--device", "cpu", "--json", "--no-server"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    assert_same_top5(bundle_scores(bundle, bundle.embed_audio(wav), cache, "image"),
                     [(h["item"], h["score"]) for h in printed])


def test_a_batch_embeds_each_item_as_it_embeds_alone(exported: Exported) -> None:
    """Clips of different lengths are padded and masked in a batch: no embedding changes."""
    bundle, cache = exported.bundle, exported.cache
    wavs = [cache.wav_path(int(r)) for r in cache.split_audio_captions("train")[:9]]
    assert len({sf.info(str(w)).frames for w in wavs}) > 1
    alone = torch.cat([bundle.embed_audio(w) for w in wavs])
    torch.testing.assert_close(bundle.embed_audio(wavs), alone, atol=1e-5, rtol=0)
    texts = ["a red circle", "a small blue square on a green background", "x"]
    torch.testing.assert_close(bundle.embed_text(texts),
                               torch.cat([bundle.embed_text(t) for t in texts]),
                               atol=1e-5, rtol=0)
    assert bundle.embed_images([]).shape == (0, 32)


def test_test_time_training_adapts_each_query_as_search_does(exported: Exported,
                                                             searcher: Searcher) -> None:
    bundle, cache = exported.bundle, exported.cache
    wav = cache.wav_path(int(cache.split_audio_captions("test")[0]))
    _, searched = searcher.encode_query(audio=wav, ttt=True)
    adapted = bundle.embed_audio(wav, ttt=True)
    torch.testing.assert_close(adapted, searched, atol=1e-5, rtol=0)
    assert not torch.allclose(adapted, bundle.embed_audio(wav), atol=1e-4)


def test_a_bimodal_bundle_and_an_unreadable_file_fail_in_one_sentence(
        tmp_path: Path, exported: Exported) -> None:
    cfg = resolve_config("tiny_cpu", [*TINY, "modalities=[image, text]"])
    tokenizer = TextTokenizer.train(["a red circle on a blue background"], cfg.vocab_size)
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"config": cfg.to_dict(), "model": NLMM(cfg).state_dict(),
                                 "tokenizer": tokenizer.to_json(), "progress": {"global_step": 1},
                                 "data": {"cache": str(tmp_path / "gone")}})
    bundle = nlmm.load_bundle(export_bundle(str(checkpoint), tmp_path / "bundle"))
    assert bundle.modalities == ("image", "text")
    wav = exported.cache.wav_path(int(exported.cache.split_audio_captions("test")[0]))
    with pytest.raises(NlmmError) as missing:
        bundle.embed_audio(wav)
    assert str(missing.value) == ("this bundle's model has no audio tower (it was trained on "
                                  "image and text only), so it cannot embed audio; embed image "
                                  "or text instead.")

    not_an_image = tmp_path / "photo.jpg"
    not_an_image.write_text("not a picture")
    with pytest.raises(NlmmError, match=r"^cannot read image file .*photo\.jpg: not a readable "
                                        r"image \(unknown or corrupt format\)\.$"):
        bundle.embed_images([not_an_image])
    with pytest.raises(NlmmError, match="is not a complete nlmm bundle"):
        nlmm.load_bundle(tmp_path)
