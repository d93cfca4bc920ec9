"""Real broken files fed through `check_corpus` and `prepare`: each is skipped with a reason in
the report, never a crash and never zero-filled."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import TINY_VOCAB, tiny_data_config
from corpus_factory import PublicCorpus, tone, write_public_corpus

import nlmm.data.parallel
from nlmm.data.cache import PreparedCache, default_cache_dir, prepare
from nlmm.data.features import BadInput, load_wav, log_mel
from nlmm.data.check import CheckReport, check_corpus
from nlmm.data.loader import TrainLoader
from nlmm.errors import NlmmError


class Broken:
    """The tiny corpus with one broken file of each kind; remembers what was broken."""

    def __init__(self, source: PublicCorpus, root: Path) -> None:
        shutil.copytree(source.root, root, ignore=shutil.ignore_patterns(".nlmm_cache"))
        self.source = source
        self.root = root
        train, dev, test = (source.images_in(s) for s in ("train", "dev", "test"))
        image_dir = root / "Flickr8k_Dataset"
        self.random_jpeg, self.truncated_jpeg = train[0], train[1]
        (image_dir / self.random_jpeg).write_bytes(np.random.default_rng(0).bytes(3000))
        data = (image_dir / self.truncated_jpeg).read_bytes()
        (image_dir / self.truncated_jpeg).write_bytes(data[:len(data) // 2])

        wav_dir = root / "flickr_audio" / "wavs"
        self.empty_wav = (dev[0], 1)
        self.truncated_wav = (dev[0], 2)
        self.missing_wav = (dev[1], 3)
        self.stereo_wav = (test[0], 0)
        (wav_dir / source.wavs[self.empty_wav]).write_bytes(b"")
        data = (wav_dir / source.wavs[self.truncated_wav]).read_bytes()
        (wav_dir / source.wavs[self.truncated_wav]).write_bytes(data[:len(data) // 2])
        (wav_dir / source.wavs[self.missing_wav]).unlink()
        # Same tone and length at 44.1 kHz, channels 1.2x and 0.8x: the mean is the mono tone.
        self.stereo_hz = source.tone_hz[source.wavs[self.stereo_wav]]
        self.stereo_seconds = 0.5
        mono = tone(self.stereo_hz, self.stereo_seconds, 44100)
        sf.write(wav_dir / source.wavs[self.stereo_wav], np.stack([1.2 * mono, 0.8 * mono], 1),
                 44100, subtype="PCM_16")

        token_file = root / "Flickr8k_text" / "Flickr8k.token.txt"
        with token_file.open("a") as fh:
            fh.write(f"{train[2]}\tA caption line whose key lacks its hash .\n")
            fh.write("2258277193_586949ec62.jpg.1#0\tA dog runs .\n")

    def wav(self, key: tuple[str, int]) -> str:
        return self.source.wavs[key]

    def expected_defects(self) -> list[tuple[str, str, str]]:
        """(kind, item, words the reason must contain)."""
        return [("bad_image", self.random_jpeg, "not a readable image"),
                ("bad_image", self.truncated_jpeg, "truncated"),
                ("bad_audio", self.wav(self.empty_wav), "empty file"),
                ("bad_audio", self.wav(self.truncated_wav), "truncated"),
                ("missing_wav", self.wav(self.missing_wav), "not in wavs/"),
                ("malformed_line", "Flickr8k.token.txt:66", "expected"),
                ("bad_image_name", "Flickr8k.token.txt:67", "2258277193_586949ec62.jpg.1")]


@pytest.fixture(scope="module")
def broken(tiny_corpus: PublicCorpus, tmp_path_factory: pytest.TempPathFactory) -> Broken:
    return Broken(tiny_corpus, tmp_path_factory.mktemp("broken") / "flickr8k")


@pytest.fixture(scope="module")
def broken_check(broken: Broken) -> CheckReport:
    return check_corpus(broken.root, decode=True, workers=1)


@pytest.fixture(scope="module")
def broken_cache(broken: Broken) -> PreparedCache:
    # Two workers and small chunks, so the broken files go through the process pool.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nlmm.data.parallel, "MIN_CHUNK", 2)
        return prepare(broken.root, tiny_data_config(), TINY_VOCAB, workers=2, progress=False)


def row_of(cache: PreparedCache, image: str, index: int) -> int:
    rows = [r for r in range(cache.n_captions)
            if cache.image_file(int(cache.caption_image(r))) == image
            and cache.caption_indices[r] == index]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("which", range(7))
def test_check_reports_each_broken_file_with_its_reason(broken: Broken, broken_check: CheckReport,
                                                        which: int) -> None:
    kind, item, words = broken.expected_defects()[which]
    hits = [d for d in broken_check.defects if (d.kind, d.item) == (kind, item)]
    assert len(hits) == 1 and words in hits[0].reason


@pytest.mark.parametrize("which", range(7))
def test_prepare_reports_each_broken_file_with_its_reason(broken: Broken,
                                                          broken_cache: PreparedCache,
                                                          which: int) -> None:
    kind, item, words = broken.expected_defects()[which]
    hits = [d for d in broken_cache.report().defects if (d.kind, d.item) == (kind, item)]
    assert len(hits) == 1 and words in hits[0].reason


def test_nothing_else_is_reported(broken: Broken, broken_check: CheckReport,
                                  broken_cache: PreparedCache) -> None:
    expected = sorted((k, i) for k, i, _ in broken.expected_defects())
    assert sorted((d.kind, d.item) for d in broken_check.defects) == expected
    assert sorted((d.kind, d.item) for d in broken_cache.report().defects) == expected


def test_counts_after_skipping(broken_check: CheckReport, broken_cache: PreparedCache) -> None:
    dev = {"images": 3, "clips": 0, "captions": 15, "wavs": 12, "triples": 12, "pairs": 15}
    test = {"images": 3, "clips": 0, "captions": 15, "wavs": 15, "triples": 15, "pairs": 15}
    # check decodes every wav; prepare only those whose image is usable.
    assert broken_check.counts["train"] == {"images": 4, "clips": 0, "captions": 30, "wavs": 30,
                                            "triples": 20, "pairs": 20}
    assert broken_cache.manifest["counts"]["train"] == {"images": 4, "clips": 0, "captions": 30, "wavs": 20,
                                                        "triples": 20, "pairs": 20}
    for counts in (broken_check.counts, broken_cache.manifest["counts"]):
        assert counts["dev"] == dev and counts["test"] == test


def test_broken_images_are_left_out_of_the_cache(broken: Broken,
                                                 broken_cache: PreparedCache) -> None:
    files = broken_cache.image_files
    assert broken.random_jpeg not in files and broken.truncated_jpeg not in files
    assert len(files) == 10 == broken_cache.images.shape[0]
    owners = {files[int(i)] for i in broken_cache.caption_image(np.arange(broken_cache.n_captions))}
    assert broken.random_jpeg not in owners and broken.truncated_jpeg not in owners
    # No row is a zero-filled stand-in: every stored image is a real drawing.
    assert (broken_cache.images.reshape(10, -1).max(axis=1) > 0).all()


@pytest.mark.parametrize("attr", ["empty_wav", "truncated_wav", "missing_wav"])
def test_caption_with_bad_wav_keeps_its_pair_without_audio(broken: Broken,
                                                           broken_cache: PreparedCache,
                                                           attr: str) -> None:
    image, index = getattr(broken, attr)
    row = row_of(broken_cache, image, index)
    assert not broken_cache.caption_has_audio(row)
    assert broken_cache.caption_wav(row) is None
    assert broken_cache.caption_text(row) == broken.source.captions[image][index]
    with pytest.raises(ValueError):
        broken_cache.mel(row)
    assert row not in broken_cache.split_audio_captions("dev")
    batch = next(b for b in TrainLoader(broken_cache, "dev", 15, seed=0, shuffle=False)
                 if row in b["caption_ids"])
    i = int(np.flatnonzero(batch["caption_ids"].numpy() == row)[0])
    assert not batch["has_audio"][i] and not batch["audio_mask"][i].any()
    assert batch["has_audio"].sum() == batch["audio_mask"].any(dim=1).sum() == 12


def test_stereo_44k_wav_is_downmixed_and_resampled(broken: Broken,
                                                   broken_cache: PreparedCache) -> None:
    row = row_of(broken_cache, *broken.stereo_wav)
    assert broken_cache.caption_has_audio(row)
    mel = broken_cache.mel(row).astype(np.float32)
    cfg = tiny_data_config()
    n16 = int(round(broken.stereo_seconds * 16000))
    assert abs(mel.shape[1] - (1 + n16 // 160)) <= 1
    wave = load_wav(broken.root / "flickr_audio" / "wavs" / broken.wav(broken.stereo_wav), 16000)
    assert abs(len(wave) - n16) <= 1
    reference = log_mel(tone(broken.stereo_hz, broken.stereo_seconds, 16000), cfg).astype(np.float32)
    t = min(mel.shape[1], reference.shape[1])
    a, b = mel[:, 2:t - 2], reference[:, 2:t - 2]  # resampler edge effects aside
    strong = b > b.max(axis=0, keepdims=True) - 5.0  # bins within ~22 dB of each frame's peak
    assert strong.sum() > 100
    assert np.abs(a - b)[strong].max() < 0.05
    # Taking one channel instead of the mean would shift the log power by 2*log(1.2) = 0.36.
    assert abs(float(np.mean(a[strong] - b[strong]))) < 0.02


def test_corpus_with_nothing_usable_is_an_error(tmp_path: Path) -> None:
    written = write_public_corpus(tmp_path / "c", n_images=3, splits=(1, 1, 1), audio=False)
    train_image = written.image_dir() / written.images_in("train")[0]
    train_image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = check_corpus(written.root, workers=1)
    assert not report.usable
    assert [d.kind for d in report.defects if d.kind == "bad_image"] == ["bad_image"]
    cfg = tiny_data_config()
    with pytest.raises(NlmmError, match="no usable image-caption or caption-audio pair"):
        prepare(written.root, cfg, TINY_VOCAB, workers=1, progress=False)
    cache_dir = default_cache_dir(written.root.resolve(), cfg, TINY_VOCAB)
    assert not cache_dir.exists()
    assert not list(cache_dir.parent.glob(f"{cache_dir.name}.tmp-*"))


def write_wav(path: Path, kind: str) -> None:
    if kind == "short":
        sf.write(path, tone(440.0, 0.05, 16000), 16000, subtype="PCM_16")
    elif kind == "nan":
        wave = tone(440.0, 0.5, 16000)
        wave[100:200] = np.nan
        sf.write(path, wave, 16000, subtype="FLOAT")
    elif kind == "silence":
        sf.write(path, np.zeros(8000, dtype=np.float32), 16000, subtype="PCM_16")
    elif kind == "noise":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif kind == "header_only":
        sf.write(path, tone(440.0, 0.5, 16000), 16000, subtype="PCM_16")
        path.write_bytes(path.read_bytes()[:44])


@pytest.mark.parametrize("kind, words", [("short", "too short"), ("nan", "NaN"),
                                         ("silence", "silence"), ("noise", "unreadable"),
                                         ("header_only", "truncated")])
def test_load_wav_rejects_unusable_audio_with_a_reason(tmp_path: Path, kind: str,
                                                       words: str) -> None:
    path = tmp_path / f"{kind}.wav"
    write_wav(path, kind)
    with pytest.raises(BadInput, match=words):
        load_wav(path, 16000)
