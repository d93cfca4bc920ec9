"""Features, tokenizer, the prepared cache (freshness, atomicity) and the batch loaders."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, tiny_data_config
from corpus_factory import (TEST_ONLY_WORD, TRAIN_ONLY_WORD, PublicCorpus, tone,
                            write_public_corpus)
from PIL import Image

import nlmm.data.cache as cache_mod
import nlmm.data.parallel
from nlmm.config import AugmentConfig, DataConfig
from nlmm.data.cache import PreparedCache, default_cache_dir, is_fresh, prepare
from nlmm.data.features import (BadInput, load_image, load_log_mel, log_mel,
                                normalize_images)
from nlmm.data.loader import TrainLoader, augment_images, iter_modality, owner_images
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError


@pytest.fixture
def corpus_copy(tiny_corpus: PublicCorpus, tmp_path: Path) -> PublicCorpus:
    root = tmp_path / "flickr8k"
    shutil.copytree(tiny_corpus.root, root, ignore=shutil.ignore_patterns(".nlmm_cache"))
    return PublicCorpus(root, dict(tiny_corpus.split_of), dict(tiny_corpus.captions),
                        dict(tiny_corpus.wavs), dict(tiny_corpus.tone_hz))


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("prepare decoded files although the cache was fresh")
    monkeypatch.setattr(cache_mod, "map_chunks", fail)
    monkeypatch.setattr(cache_mod, "_build", fail)


# --------------------------------------------------------------------------- features

def hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@pytest.mark.parametrize("n_samples", [16000, 8000, 1600, 1759, 16159, 16160])
def test_log_mel_frame_count_is_one_plus_samples_over_hop(n_samples: int) -> None:
    cfg = DataConfig()
    mel = log_mel(tone(440.0, n_samples / 16000, 16000), cfg)
    assert mel.dtype == np.float16
    assert mel.shape == (80, 1 + n_samples // 160) == (80, cfg.mel_frames(n_samples))


def test_one_second_clip_gives_101_frames_and_long_clips_are_cropped() -> None:
    cfg = DataConfig(max_audio_seconds=2.0)
    assert log_mel(tone(440.0, 1.0, 16000), cfg).shape == (80, 101)
    assert log_mel(tone(440.0, 3.0, 16000), cfg).shape == (80, 201)


def plain_log_mel(x: np.ndarray, sr: int = 16000, n_fft: int = 400, hop: int = 160,
                  n_mels: int = 80) -> np.ndarray:
    """Centred STFT (reflect padding, periodic Hann), power, HTK triangles, log(x + 1e-6)."""
    xp = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([xp[i * hop:i * hop + n_fft] * window for i in range(1 + len(x) // hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sr / 2)), n_mels + 2))
    rising = (freqs[:, None] - pts[None, :-2]) / (pts[1:-1] - pts[:-2])
    falling = (pts[None, 2:] - freqs[:, None]) / (pts[2:] - pts[1:-1])
    bank = np.maximum(0.0, np.minimum(rising, falling))
    return np.log(power @ bank + 1e-6).T


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_log_mel_matches_a_plain_numpy_computation(freq: float) -> None:
    x = tone(freq, 1.0, 16000) + tone(freq * 1.37, 1.0, 16000, amplitude=0.05)
    ours = log_mel(x, DataConfig()).astype(np.float64)
    plain = plain_log_mel(x)
    assert ours.shape == plain.shape == (80, 101)
    assert np.abs(ours - plain).max() < 0.05


@pytest.mark.parametrize("freq", [1000.0, 2520.0, 4000.0, 6000.0])
def test_pure_tone_peaks_in_the_mel_bin_centred_on_it(freq: float) -> None:
    # From 1 kHz up, adjacent mel centres are further apart than the 40 Hz FFT bins, so the
    # triangle whose centre is nearest the tone collects the most energy.
    mel = log_mel(tone(freq, 1.0, 16000), DataConfig()).astype(np.float32)
    centres = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(8000.0)), 82))[1:-1]
    expected = int(np.argmin(np.abs(centres - freq)))
    profile = mel[:, 5:-5].mean(axis=1)
    assert int(np.argmax(profile)) == expected
    assert profile.max() > profile.min() + 10  # far bins sit near log(1e-6)


def test_load_image_resizes_the_shorter_side_and_crops_the_centre(tmp_path: Path) -> None:
    img = Image.new("RGB", (96, 48), (255, 0, 0))
    img.paste((0, 255, 0), (24, 0, 72, 48))  # a green square in the middle, red on both sides
    img.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 32)
    assert out.dtype == np.uint8 and out.shape == (3, 32, 32)
    mean = out.reshape(3, -1).mean(axis=1)
    assert mean[1] > 240 and mean[0] < 15  # the crop holds only the green middle
    Image.new("L", (20, 40), 128).save(tmp_path / "grey.jpg")
    assert load_image(tmp_path / "grey.jpg", 16).shape == (3, 16, 16)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(BadInput):
        load_image(tmp_path / "text.jpg", 16)


def test_normalize_images_matches_the_imagenet_formula() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalize_images(x)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        plain = (x[:, c].double() / 255.0 - mean[c]) / std[c]
        assert torch.allclose(out[:, c].double(), plain, atol=1e-5)
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_is_trained_on_train_captions_only(tiny_corpus: PublicCorpus,
                                                     tiny_cache: PreparedCache) -> None:
    tok = tiny_cache.tokenizer
    assert TRAIN_ONLY_WORD in tok.vocab() and tok.tokens(TRAIN_ONLY_WORD) == [TRAIN_ONLY_WORD]
    assert TEST_ONLY_WORD not in tok.vocab() and len(tok.tokens(TEST_ONLY_WORD)) > 1
    # The same trainer fed every caption does learn the test-only word.
    everything = [t for caps in tiny_corpus.captions.values() for t in caps]
    assert TEST_ONLY_WORD in TextTokenizer.train(everything, TINY_VOCAB).vocab()


def test_tokenizer_encoding_padding_and_round_trip(tiny_cache: PreparedCache,
                                                   tmp_path: Path) -> None:
    tok = tiny_cache.tokenizer
    assert (tok.pad_id, tok.vocab()["[MASK]"]) == (0, tok.mask_id)
    assert tok.vocab_size <= TINY_VOCAB
    ids, lengths = tok.encode_batch(["A RED Circle .", "", "red " * 40], max_len=8)
    assert ids.dtype == np.int32 and ids.shape == (3, 8) and lengths.tolist() == [4, 1, 8]
    assert (ids[0, 4:] == 0).all() and ids[1, 0] == tok.unk_id
    assert ids[0].tolist()[:4] == [tok.vocab()[w] for w in ("a", "red", "circle", ".")]
    tok.save(tmp_path / "tok.json")
    for other in (TextTokenizer.load(tmp_path / "tok.json"), TextTokenizer.from_json(tok.to_json())):
        again, again_len = other.encode_batch(["A RED Circle .", "", "red " * 40], max_len=8)
        assert np.array_equal(again, ids) and np.array_equal(again_len, lengths)


# --------------------------------------------------------------------------- cache contents

def test_cache_arrays_equal_direct_decoding(tiny_corpus: PublicCorpus,
                                            tiny_cache: PreparedCache) -> None:
    cfg = tiny_data_config()
    assert tiny_cache.images.shape == (12, 3, 32, 32)
    assert set(tiny_cache.image_files) == {n for n, s in tiny_corpus.split_of.items() if s}
    for row in (0, 5, 11):
        name = tiny_cache.image_file(row)
        assert np.array_equal(tiny_cache.images[row], load_image(tiny_corpus.image_dir() / name, 32))
    assert tiny_cache.n_captions == 60 and tiny_cache.tokens.shape == (60, cfg.text_max_len)
    for row in (0, 17, 59):
        image = tiny_cache.image_file(int(tiny_cache.caption_image(row)))
        index = int(tiny_cache.caption_indices[row])
        assert tiny_cache.caption_text(row) == tiny_corpus.captions[image][index]
        assert tiny_cache.caption_wav(row) == tiny_corpus.wavs[(image, index)]
        assert np.array_equal(tiny_cache.mel(row), load_log_mel(tiny_corpus.wav_path(image, index), cfg))
        assert tiny_cache.mel(row).shape == (80, 1 + int(round((0.5 + 0.05 * index) * 16000)) // 160)
        ids, n = tiny_cache.tokenizer.encode_batch([tiny_cache.caption_text(row)], cfg.text_max_len)
        assert np.array_equal(tiny_cache.tokens[row], ids[0]) and tiny_cache.token_lengths[row] == n[0]
    counts = tiny_cache.manifest["counts"]
    assert counts["train"] == {"images": 6, "clips": 0, "captions": 30, "wavs": 30, "triples": 30, "pairs": 30}
    assert tiny_cache.manifest["unassigned_images"] == 1 and tiny_cache.manifest["defects"] == []


def test_split_rows_and_lookups(tiny_corpus: PublicCorpus, tiny_cache: PreparedCache) -> None:
    for split in ("train", "dev", "test"):
        images = tiny_cache.split_images(split)
        assert sorted(tiny_cache.image_file(int(r)) for r in images) == sorted(tiny_corpus.images_in(split))
        caps = tiny_cache.split_captions(split)
        assert len(caps) == 5 * len(images)
        assert set(tiny_cache.caption_image(caps).tolist()) == set(images.tolist())
        assert tiny_cache.caption_has_audio(caps).all()
    with pytest.raises(ValueError):
        tiny_cache.split_images("validation")


def test_pool_build_equals_single_process_build(tiny_corpus: PublicCorpus, tiny_cache: PreparedCache,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nlmm.data.parallel, "MIN_CHUNK", 2)
    pooled = prepare(tiny_corpus.root, tiny_data_config(), TINY_VOCAB, cache_dir=tmp_path / "c",
                     workers=2, progress=False)
    assert np.array_equal(pooled.images, tiny_cache.images)
    assert np.array_equal(pooled.tokens, tiny_cache.tokens)
    for row in range(0, 60, 7):
        assert np.array_equal(pooled.mel(row), tiny_cache.mel(row))
    assert pooled.key == tiny_cache.key


# --------------------------------------------------------------------------- freshness

def test_second_prepare_is_a_no_op(corpus_copy: PublicCorpus, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_data_config()
    first = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    assert first.path == default_cache_dir(corpus_copy.root.resolve(), cfg, TINY_VOCAB)
    manifest_mtime = (first.path / "manifest.json").stat().st_mtime_ns
    assert is_fresh(corpus_copy.root, cfg, TINY_VOCAB)
    forbid_decoding(monkeypatch)
    second = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    assert second.path == first.path and second.key == first.key
    assert (second.path / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_touched_source_file_makes_the_cache_stale_and_rebuilds(corpus_copy: PublicCorpus) -> None:
    cfg = tiny_data_config()
    first = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    wav = corpus_copy.wav_path(corpus_copy.images_in("dev")[0], 0)
    stat = wav.stat()
    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert not is_fresh(corpus_copy.root, cfg, TINY_VOCAB)
    with pytest.raises(NlmmError, match="stale"):
        PreparedCache.open(first.path)
    second = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    assert second.path == first.path and second.key != first.key
    assert PreparedCache.open(second.path).key == second.key


def test_edited_caption_rebuilds_with_the_new_text(corpus_copy: PublicCorpus) -> None:
    cfg = tiny_data_config()
    prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    token_file = corpus_copy.root / "Flickr8k_text" / "Flickr8k.token.txt"
    stat = token_file.stat()
    # Same length and the old mtime put back: only the content hash can notice this edit.
    token_file.write_text(token_file.read_text().replace("A picture of", "A drawing of", 1))
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert token_file.stat().st_size == stat.st_size
    assert not is_fresh(corpus_copy.root, cfg, TINY_VOCAB)
    rebuilt = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    assert sum(t.startswith("A drawing of") for t in rebuilt.caption_texts) == 1


def test_corpus_copied_with_its_cache_gets_its_own_cache(corpus_copy: PublicCorpus,
                                                          tmp_path: Path) -> None:
    cfg = tiny_data_config()
    first = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(corpus_copy.root, moved)  # copy2 keeps sizes and mtimes
    assert not is_fresh(moved, cfg, TINY_VOCAB)
    second = prepare(moved, cfg, TINY_VOCAB, workers=1, progress=False)
    assert second.path.is_relative_to(moved.resolve())
    assert second.image_path(0).is_relative_to(moved.resolve()) and second.image_path(0).is_file()
    assert first.image_path(0).is_relative_to(corpus_copy.root.resolve())


def test_changed_parameter_builds_another_cache(corpus_copy: PublicCorpus, tmp_path: Path) -> None:
    cfg = tiny_data_config()
    small = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    bigger = dataclasses.replace(cfg, image_size=48)
    assert not is_fresh(corpus_copy.root, bigger, TINY_VOCAB)
    big = prepare(corpus_copy.root, bigger, TINY_VOCAB, workers=1, progress=False)
    assert big.path != small.path and big.images.shape == (12, 3, 48, 48)
    no_crop = dataclasses.replace(cfg.augment, crop=not cfg.augment.crop)
    assert is_fresh(corpus_copy.root, dataclasses.replace(cfg, augment=no_crop), TINY_VOCAB)
    # An explicit folder holding a cache built with other parameters is rebuilt in place.
    explicit = tmp_path / "explicit"
    prepare(corpus_copy.root, cfg, TINY_VOCAB, cache_dir=explicit, workers=1, progress=False)
    rebuilt = prepare(corpus_copy.root, bigger, TINY_VOCAB, cache_dir=explicit, workers=1,
                      progress=False)
    assert rebuilt.images.shape == (12, 3, 48, 48) and rebuilt.data_cfg.image_size == 48


def test_crash_during_build_leaves_no_cache_that_looks_valid(corpus_copy: PublicCorpus,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_data_config()
    good = prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    good_key = good.key
    wav = corpus_copy.wav_path(corpus_copy.images_in("train")[0], 1)
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 5_000_000))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cache_mod.TextTokenizer, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_copy.root, cfg, TINY_VOCAB, workers=1, progress=False)
    assert not list(good.path.parent.glob("*.tmp-*"))
    # The old cache is still there, untouched, and refused because its sources changed.
    assert json.loads((good.path / "manifest.json").read_text())["key"] == good_key
    with pytest.raises(NlmmError, match="stale"):
        PreparedCache.open(good.path)


def test_image_text_only_corpus_prepares_pairs_without_audio(tmp_path: Path) -> None:
    written = write_public_corpus(tmp_path / "c", n_images=5, splits=(2, 1, 1), audio=False)
    cache = prepare(written.root, tiny_data_config(), TINY_VOCAB, workers=1, progress=False)
    assert cache.n_captions == 20 and cache.mels.shape == (0, 80)
    assert not cache.caption_has_audio(np.arange(20)).any()
    assert cache.manifest["counts"]["total"]["pairs"] == 20
    assert [d["kind"] for d in cache.manifest["defects"]] == ["no_audio"]
    assert cache.modalities() == ("image", "text")
    batch = next(iter(TrainLoader(cache, "train", 4, seed=0)))
    # a corpus without audio gives batches without it: nothing to gather, nothing to encode
    assert "audio" not in batch and "has_audio" not in batch and bool(batch["has_image"].all())
    assert list(iter_modality(cache, "test", "audio", 4)) == []
    assert sum(len(rows) for _, _, rows in iter_modality(cache, "test", "text", 4)) == 5


def test_open_refuses_missing_and_other_version_caches(tiny_cache: PreparedCache,
                                                       tmp_path: Path) -> None:
    with pytest.raises(NlmmError, match="nlmm data prepare"):
        PreparedCache.open(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = cache_mod.CACHE_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NlmmError, match="version"):
        PreparedCache.open(copy)


# --------------------------------------------------------------------------- loaders

def test_train_loader_batches_have_the_documented_layout(tiny_cache: PreparedCache) -> None:
    loader = TrainLoader(tiny_cache, "train", 8, seed=3, max_audio_frames=60)
    assert len(loader) == 30 // 8
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        rows = b["caption_ids"].numpy()
        assert b["caption_ids"].dtype == b["image_ids"].dtype == b["text"].dtype == torch.int64
        lengths = tiny_cache.token_lengths[rows]
        assert b["text"].shape == (8, lengths.max()) and b["text_mask"].dtype == torch.bool
        assert b["text_mask"].sum(1).tolist() == lengths.tolist()
        assert np.array_equal(b["text"].numpy(), tiny_cache.tokens[rows, :lengths.max()])
        assert np.array_equal(b["image_ids"].numpy(), tiny_cache.caption_image(rows))
        plain = (torch.from_numpy(np.asarray(tiny_cache.images[b["image_ids"].numpy()])).double()
                 / 255 - torch.tensor([0.485, 0.456, 0.406]).double().view(3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).double().view(3, 1, 1)
        assert b["image"].dtype == torch.float32 and b["image"].shape == (8, 3, 32, 32)
        assert torch.allclose(b["image"].double(), plain, atol=1e-5)
        frames = np.minimum(tiny_cache.mel_lengths[rows], 60)
        assert b["audio"].shape == (8, 1, 80, frames.max()) and b["audio"].dtype == torch.float32
        assert b["audio_mask"].sum(1).tolist() == frames.tolist()
        assert b["has_audio"].all()
        for i, row in enumerate(rows):
            n = frames[i]
            assert np.array_equal(b["audio"][i, 0, :, :n].numpy(),
                                  tiny_cache.mel(row)[:, :n].astype(np.float32))


def test_train_loader_order_is_reproducible_and_resumable(tiny_cache: PreparedCache) -> None:
    def run(**kw):
        return list(TrainLoader(tiny_cache, "train", 4, seed=7, crop=True, flip=True, **kw))

    full, again = run(epoch=2), run(epoch=2)
    assert len(full) == 7
    for a, b in zip(full, again, strict=True):
        assert torch.equal(a["caption_ids"], b["caption_ids"]) and torch.equal(a["image"], b["image"])
    order = torch.cat([b["caption_ids"] for b in full]).tolist()
    assert len(set(order)) == 28 and set(order) <= set(tiny_cache.split_captions("train").tolist())
    other_epoch = torch.cat([b["caption_ids"] for b in run(epoch=3)]).tolist()
    assert other_epoch != order
    tail = run(epoch=2, start_batch=4)
    assert len(tail) == 3
    for a, b in zip(full[4:], tail, strict=True):
        assert torch.equal(a["caption_ids"], b["caption_ids"]) and torch.equal(a["image"], b["image"])
    everything = TrainLoader(tiny_cache, "train", 4, seed=7, drop_last=False, shuffle=False,
                             device="cpu")
    assert len(everything) == 8
    served = torch.cat([b["caption_ids"] for b in everything]).tolist()
    assert served == tiny_cache.split_captions("train").tolist()
    with pytest.raises(NlmmError, match="batch_size"):
        TrainLoader(tiny_cache, "train", 31, seed=0)


def test_augmentation_is_a_random_resized_crop_with_flips() -> None:
    # Channel 0 holds each pixel's x coordinate, channel 1 its y (normalised, pixel centres).
    # Bilinear sampling reproduces a linear ramp exactly, so the output shows the sampling map.
    b, size = 64, 40
    coords = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    ramp = torch.stack([coords.expand(size, size), coords[:, None].expand(size, size),
                        torch.zeros(size, size)])
    out = augment_images(ramp.expand(b, 3, size, size).contiguous(), torch.Generator().manual_seed(5))
    x, y = out[:, 0], out[:, 1]
    step = 1.0 / size  # border clamping may move an edge sample by half a pixel
    assert (x.amax(dim=1) - x.amin(dim=1)).max() < 1e-5  # x depends on the column only
    assert (y.amax(dim=2) - y.amin(dim=2)).max() < 1e-5  # y on the row only
    sx = (x[:, 0, -2] - x[:, 0, 1]) / (coords[-2] - coords[1])  # signed width of the crop
    sy = (y[:, -2, 0] - y[:, 1, 0]) / (coords[-2] - coords[1])
    inner = x[:, 0, 1:-1]
    assert torch.allclose(inner[:, 1:] - inner[:, :-1], (sx * 2 / size)[:, None].expand(b, size - 3),
                          atol=1e-4)  # linear: a resize, no distortion
    assert ((sx.abs() > 0.72 - step) & (sx.abs() <= 1 + 1e-4)).all()
    assert ((sy > 0.72 - step) & (sy <= 1 + 1e-4)).all()
    area = sx.abs() * sy
    assert ((area > 0.7 - 2 * step) & (area <= 1 + 1e-4)).all()
    flipped = int((sx < 0).sum())
    assert 16 < flipped < 48  # about half of the batch is mirrored
    assert out.abs().max() <= 1.0 + 1e-5 and torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


@pytest.mark.parametrize("crop, flip", [(True, False), (False, True)])
def test_each_augmentation_is_its_own_switch(crop: bool, flip: bool) -> None:
    b, size = 64, 40
    coords = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    ramp = torch.stack([coords.expand(size, size), coords[:, None].expand(size, size),
                        torch.zeros(size, size)]).expand(b, 3, size, size).contiguous()
    out = augment_images(ramp, torch.Generator().manual_seed(5), crop=crop, flip=flip)
    sx = (out[:, 0, 0, -2] - out[:, 0, 0, 1]) / (coords[-2] - coords[1])
    sy = (out[:, 1, -2, 0] - out[:, 1, 1, 0]) / (coords[-2] - coords[1])
    if crop:  # cropped, never mirrored: a caption's "left" stays on the left
        assert (sx > 0).all() and (sx.abs() * sy < 0.99).any()
    else:  # mirrored only: the whole picture, same scale
        assert torch.allclose(sx.abs(), torch.ones(b), atol=1e-4) and (sx < 0).any()
        assert torch.allclose(sy, torch.ones(b), atol=1e-4)


def test_flat_augment_flag_sets_both_switches() -> None:
    from nlmm.config import config_from_dict

    assert config_from_dict({"data": {"augment": False}}).data.augment == AugmentConfig(False, False)
    assert config_from_dict({"data": {"augment": True}}).data.augment == AugmentConfig(True, True)
    default = config_from_dict({})
    assert default.data.augment.crop and not default.data.augment.flip
    assert config_from_dict({}, overrides=["data.augment.flip=true"]).data.augment.flip


def test_augmentation_crops_and_flips_within_the_image(tiny_cache: PreparedCache) -> None:
    plain = next(iter(TrainLoader(tiny_cache, "train", 8, seed=1)))
    aug = next(iter(TrainLoader(tiny_cache, "train", 8, seed=1, crop=True, flip=True)))
    assert torch.equal(plain["caption_ids"], aug["caption_ids"])
    assert aug["image"].shape == plain["image"].shape
    assert not torch.allclose(aug["image"], plain["image"])
    # Bilinear resampling inside the image never leaves each image's own value range.
    lo = plain["image"].amin(dim=(2, 3), keepdim=True) - 1e-4
    hi = plain["image"].amax(dim=(2, 3), keepdim=True) + 1e-4
    assert ((aug["image"] >= lo) & (aug["image"] <= hi)).all()


@pytest.mark.parametrize("modality, count", [("image", 3), ("text", 15), ("audio", 15)])
def test_iter_modality_covers_each_item_once_with_its_owner(tiny_corpus: PublicCorpus,
                                                            tiny_cache: PreparedCache,
                                                            modality: str, count: int) -> None:
    served = []
    for x, mask, rows in iter_modality(tiny_cache, "test", modality, 4, "cpu"):
        assert x.shape[0] == len(rows) <= 4
        if modality == "image":
            assert mask is None and x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        elif modality == "text":
            assert x.dtype == torch.int64 and mask.shape == x.shape
        else:
            assert x.shape[1:3] == (1, 80) and mask.shape == (len(rows), x.shape[3])
        served.extend(rows.tolist())
    assert len(served) == len(set(served)) == count
    owners = owner_images(tiny_cache, "test", modality)
    assert len(owners) == count
    test_images = set(tiny_corpus.images_in("test"))
    for row, owner in zip(served, owners, strict=True):
        image = tiny_cache.image_file(int(owner))
        assert image in test_images
        if modality != "image":
            index = int(tiny_cache.caption_indices[row])
            assert tiny_cache.caption_text(row) == tiny_corpus.captions[image][index]
        else:
            assert owner == row
    assert len(set(owners.tolist())) == 3
