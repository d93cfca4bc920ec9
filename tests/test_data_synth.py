"""The offline synthetic corpus: Flickr8k + FACC layout, formats, splits, determinism, content."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nlmm.data.speech import make_speakers, speak_builtin, speak_espeak
from nlmm.data.synth import (BACKGROUNDS, COLOURS, Scene, Shape, captions_for, draw_grid_scenes,
                              draw_scenes, grid_captions_for, synth_corpus)
from nlmm.errors import NlmmError

TOKEN_LINE = re.compile(r"^\S+\.jpg#[0-4]\t.+ \.$")
WAV2CAPT_LINE = re.compile(r"^(\S+)_([0-4])\.wav (\S+)\.jpg #([0-4])$")
WAV2SPK_LINE = re.compile(r"^(\S+_[0-4]\.wav) ([0-9]+)$")
IMAGE_ID = re.compile(r"^[0-9]+_[0-9a-f]{10}$")

# What the colour words mean, written independently of the generator's palette.
NAMED_RGB = {
    "red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "orange": (255, 140, 0), "purple": (128, 0, 128), "pink": (255, 150, 200),
    "white": (255, 255, 255), "black": (0, 0, 0), "brown": (140, 80, 30),
}
# Where the position words put an object's centre, as fractions of the image side.
PLACE = {"on the left": (0.22, 0.5), "on the right": (0.78, 0.5), "at the top": (0.5, 0.22),
         "at the bottom": (0.5, 0.78), "in the center": (0.5, 0.5)}
OBJECT = re.compile(r"(?:a|an) (\w+) (\w+) (on the left|on the right|at the top|at the bottom|"
                    r"in the center)")


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    counts = synth_corpus(out, n_images=24, seed=3, progress=False, engine="builtin", workers=1)
    return out, counts


def test_layout_and_line_formats(corpus: tuple[Path, dict]) -> None:
    out, counts = corpus
    text = out / "Flickr8k_text"
    jpgs = sorted((out / "Flickr8k_Dataset").glob("*.jpg"))
    assert len(jpgs) == counts["images"] == 24
    ids = {p.stem for p in jpgs}
    assert all(IMAGE_ID.match(i) for i in ids)
    for path in jpgs[:4]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size[0] >= 64

    for name in ("Flickr8k.token.txt", "Flickr8k.lemma.token.txt"):
        lines = read_lines(text / name)
        assert len(lines) == 5 * 24
        assert all(TOKEN_LINE.match(line) for line in lines), name
        keys = [line.split("\t")[0] for line in lines]
        assert sorted(keys) == sorted(f"{i}.jpg#{n}" for i in ids for n in range(5))
    lemmas = [line.split("\t")[1] for line in read_lines(text / "Flickr8k.lemma.token.txt")]
    assert all(lemma == lemma.lower() for lemma in lemmas)

    wav2capt = read_lines(out / "flickr_audio" / "wav2capt.txt")
    assert wav2capt and all(WAV2CAPT_LINE.match(line) for line in wav2capt)
    for line in wav2capt:
        stem, n, image, m = WAV2CAPT_LINE.match(line).groups()
        assert stem == image and n == m and image in ids
    wav2spk = read_lines(out / "flickr_audio" / "wav2spk.txt")
    assert [WAV2SPK_LINE.match(s).group(1) for s in wav2spk] == [c.split()[0] for c in wav2capt]
    speakers = {int(WAV2SPK_LINE.match(s).group(2)) for s in wav2spk}
    assert min(speakers) >= 1 and max(speakers) <= counts["speakers"] and len(speakers) > 1


def test_splits_partition_and_some_images_have_no_split(corpus: tuple[Path, dict]) -> None:
    out, counts = corpus
    text = out / "Flickr8k_text"
    ids = {p.name for p in (out / "Flickr8k_Dataset").glob("*.jpg")}
    splits = {s: read_lines(text / f"Flickr_8k.{s}Images.txt") for s in ("train", "dev", "test")}
    sets = {s: set(v) for s, v in splits.items()}
    assert all(len(v) == len(sets[s]) for s, v in splits.items())  # no duplicates inside a split
    assert not (sets["train"] & sets["dev"] or sets["train"] & sets["test"]
                or sets["dev"] & sets["test"])
    in_split = sets["train"] | sets["dev"] | sets["test"]
    assert in_split < ids
    assert len(ids - in_split) == counts["unsplit"] >= 1
    assert len(sets["dev"]) >= 2 and len(sets["test"]) >= 2
    assert len(sets["train"]) > len(sets["dev"])


def test_every_split_caption_has_a_16k_mono_pcm16_wav(corpus: tuple[Path, dict]) -> None:
    out, counts = corpus
    text = out / "Flickr8k_text"
    in_split = {line[:-4] for s in ("train", "dev", "test")
                for line in read_lines(text / f"Flickr_8k.{s}Images.txt")}
    captioned = {line.split("\t")[0] for line in read_lines(text / "Flickr8k.token.txt")}
    expected = {f"{i}_{n}.wav" for i in in_split for n in range(5)}
    listed = {line.split()[0] for line in read_lines(out / "flickr_audio" / "wav2capt.txt")}
    on_disk = {p.name for p in (out / "flickr_audio" / "wavs").glob("*.wav")}
    assert listed == on_disk == expected and len(expected) == counts["wavs"]
    assert {f"{w[:-6]}.jpg#{w[-5]}" for w in expected} <= captioned
    for name in sorted(on_disk)[:12]:
        info = sf.info(str(out / "flickr_audio" / "wavs" / name))
        assert (info.samplerate, info.channels, info.subtype, info.format) == \
            (16000, 1, "PCM_16", "WAV")
        assert 0.5 <= info.duration <= 4.0 + 1e-3
        samples, _ = sf.read(str(out / "flickr_audio" / "wavs" / name), dtype="int16")
        assert np.abs(samples).max() > 3000  # audible, not silence


def test_no_two_images_share_a_caption(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    captions = [line.split("\t")[1].lower()
                for line in read_lines(out / "Flickr8k_text" / "Flickr8k.token.txt")]
    assert len(set(captions)) == len(captions)


def test_8000_images_give_distinct_identifying_captions() -> None:
    scenes = draw_scenes(8000, np.random.default_rng(11))
    rng = np.random.default_rng(0)
    captions = [c.lower() for s in scenes for c in captions_for(s, rng)]
    assert len(set(captions)) == len(captions) == 40000
    # A one-object caption names (colour, shape, position, background); no other scene may hold
    # that object on that background, or the caption would fit two images.
    holders: dict[tuple, int] = {}
    for scene in scenes:
        for o in scene.objects:
            key = (o.colour, o.shape, o.position, scene.background)
            holders[key] = holders.get(key, 0) + 1
    for scene in scenes:
        if len(scene.objects) == 1:
            o = scene.objects[0]
            assert holders[(o.colour, o.shape, o.position, scene.background)] == 1
    assert sum(len(s.objects) == 1 for s in scenes) > 100


def test_image_pixels_show_the_named_colours_where_the_caption_says(
        corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    checked = 0
    for line in read_lines(out / "Flickr8k_text" / "Flickr8k.token.txt"):
        key, caption = line.split("\t")
        if not key.endswith("#0"):
            continue
        objects = OBJECT.findall(caption.lower())
        assert objects, caption
        with Image.open(out / "Flickr8k_Dataset" / key[:-2]) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=float)
        side = pixels.shape[0]
        for colour, _shape, place in objects:
            fx, fy = PLACE[place]
            x, y = round(fx * side), round(fy * side)
            rgb = np.median(pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3), axis=0)
            nearest = min(NAMED_RGB, key=lambda c: np.sum((rgb - NAMED_RGB[c]) ** 2))
            assert nearest == colour, (caption, place, rgb)
            checked += 1
    assert checked >= 24


def test_same_seed_same_bytes_across_worker_counts_and_other_seed_differs(
        tmp_path: Path) -> None:
    synth_corpus(tmp_path / "a", n_images=16, seed=5, progress=False, engine="builtin", workers=1)
    synth_corpus(tmp_path / "b", n_images=16, seed=5, progress=False, engine="builtin", workers=2)
    synth_corpus(tmp_path / "c", n_images=16, seed=6, progress=False, engine="builtin", workers=1)
    a, b, c = (tree_digest(tmp_path / d) for d in "abc")
    assert len(a) > 16 + 6 and a == b
    assert a != c
    assert set(a.values()).isdisjoint(v for k, v in c.items() if k.endswith((".jpg", ".wav")))


def test_refuses_to_mix_with_an_existing_corpus_unless_overwriting(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    synth_corpus(out, n_images=8, seed=1, progress=False, engine="builtin")
    stale = out / "Flickr8k_Dataset" / "stale.jpg"
    shutil.copy(next((out / "Flickr8k_Dataset").glob("*.jpg")), stale)
    with pytest.raises(NlmmError, match="already holds a corpus"):
        synth_corpus(out, n_images=8, seed=2, progress=False, engine="builtin")
    synth_corpus(out, n_images=8, seed=2, progress=False, engine="builtin", overwrite=True)
    assert not stale.exists()
    assert len(list((out / "Flickr8k_Dataset").glob("*.jpg"))) == 8


@pytest.mark.parametrize("n_images", [3, 50000])
def test_rejects_image_counts_outside_the_supported_range(tmp_path: Path, n_images: int) -> None:
    with pytest.raises(NlmmError, match="between"):
        synth_corpus(tmp_path / "x", n_images=n_images, progress=False, engine="builtin")
    assert not (tmp_path / "x").exists()


# The grid mode's cells by the words of a grid scene's first caption, as fractions of the side.
GRID_PLACE = {"at the top left": (0.18, 0.18), "at the top": (0.5, 0.18),
              "at the top right": (0.82, 0.18), "on the left": (0.18, 0.5),
              "in the center": (0.5, 0.5), "on the right": (0.82, 0.5),
              "at the bottom left": (0.18, 0.82), "at the bottom": (0.5, 0.82),
              "at the bottom right": (0.82, 0.82)}
# Longer phrases first, so "at the top left" is not read as "at the top".
GRID_OBJECT = re.compile(r"(?:a|an) (\w+) (\w+) ("
                         + "|".join(sorted(GRID_PLACE, key=len, reverse=True)) + ")")
GRID_BACKGROUND = re.compile(r" on an? (\w+) background \.$")


@pytest.fixture(scope="module")
def grid_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grid") / "corpus"
    synth_corpus(out, n_images=16, seed=4, progress=False, engine="builtin", workers=1, objects=3)
    return out


def grid_captions(out: Path) -> dict[str, list[str]]:
    by_image: dict[str, list[str]] = {}
    for line in read_lines(out / "Flickr8k_text" / "Flickr8k.token.txt"):
        key, caption = line.split("\t")
        by_image.setdefault(key.split("#")[0], []).append(caption.lower())
    return by_image


def test_grid_captions_name_every_object_and_fit_one_image(grid_corpus: Path) -> None:
    lines = read_lines(grid_corpus / "Flickr8k_text" / "Flickr8k.token.txt")
    assert all(TOKEN_LINE.match(line) and line.split("\t")[1][0].isupper() for line in lines)
    by_image = grid_captions(grid_corpus)
    assert len(by_image) == 16 and all(len(c) == 5 for c in by_image.values())
    facts = set()
    for captions in by_image.values():
        objects = GRID_OBJECT.findall(captions[0])
        assert len(objects) == 3 and len({place for *_, place in objects}) == 3, captions[0]
        (background,) = GRID_BACKGROUND.search(captions[0]).groups()
        for caption in captions:
            assert background in caption.split()
            for colour, shape, _place in objects:
                assert f"{colour} {shape}" in caption, (colour, shape, caption)
        facts.add((frozenset(objects), background))
    assert len(facts) == len(by_image)  # no caption's facts fit a second image


def test_grid_scenes_have_distinct_facts_and_relational_captions() -> None:
    scenes = draw_grid_scenes(2000, 2, np.random.default_rng(2))
    assert all(s.grid and len({o.position for o in s.objects}) == 2 for s in scenes)
    facts = {(frozenset((o.colour, o.shape, o.position) for o in s.objects), s.background)
             for s in scenes}
    assert len(facts) == len(scenes)
    rng = np.random.default_rng(0)
    captions = [grid_captions_for(s, rng) for s in scenes[:50]]
    relations = (" above ", " below ", " to the left of ", " to the right of ")
    assert all(any(r in c for c in five for r in relations) for five in captions)
    assert any(" large " in c or " small " in c for five in captions for c in five)


def test_grid_relations_follow_the_cells() -> None:
    def chain(red_at: str, blue_at: str) -> str:
        scene = Scene((Shape("circle", "red", red_at, "small"),
                       Shape("square", "blue", blue_at, "large")), "grey", "plain", grid=True)
        return grid_captions_for(scene, np.random.default_rng(0))[2].lower()

    assert "which is above a blue square" in chain("top", "center")
    # Swapping the two objects' cells changes the relation, not only the cell names.
    assert "which is below a blue square" in chain("center", "top")
    assert "which is above a blue square" in chain("top right", "bottom left")
    assert "which is to the left of a blue square" in chain("left", "right")
    assert "which is to the right of a blue square" in chain("bottom right", "bottom")


def test_grid_same_seed_same_bytes_and_objects_change_the_corpus(tmp_path: Path) -> None:
    synth_corpus(tmp_path / "a", n_images=8, seed=5, progress=False, engine="builtin", workers=1,
                 objects=4)
    synth_corpus(tmp_path / "b", n_images=8, seed=5, progress=False, engine="builtin", workers=2,
                 objects=4)
    synth_corpus(tmp_path / "c", n_images=8, seed=5, progress=False, engine="builtin", workers=1)
    a, b, c = (tree_digest(tmp_path / d) for d in "abc")
    assert a == b and a != c


@pytest.mark.parametrize("objects", [0, 1, 6])
def test_grid_rejects_object_counts_outside_2_to_5(tmp_path: Path, objects: int) -> None:
    with pytest.raises(NlmmError, match="between 2 and 5 objects"):
        synth_corpus(tmp_path / "x", n_images=8, progress=False, engine="builtin",
                     objects=objects)
    assert not (tmp_path / "x").exists()


def test_grid_image_shows_each_object_colour_at_its_cell(grid_corpus: Path) -> None:
    checked = 0
    for image, captions in grid_captions(grid_corpus).items():
        (background,) = GRID_BACKGROUND.search(captions[0]).groups()
        with Image.open(grid_corpus / "Flickr8k_Dataset" / image) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=float)
        side = pixels.shape[0]
        for colour, _shape, place in GRID_OBJECT.findall(captions[0]):
            fx, fy = GRID_PLACE[place]
            x, y = round(fx * side), round(fy * side)
            rgb = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0)
            to_object = np.linalg.norm(rgb - COLOURS[colour])
            to_background = np.linalg.norm(rgb - BACKGROUNDS[background])
            assert to_object < to_background, (captions[0], place, rgb)
            checked += 1
    assert checked == 3 * 16


def mean_log_spectrum(samples: np.ndarray, bands: int = 40) -> np.ndarray:
    """Mean over 25 ms frames of the log power in equal-width bands, centred (for Pearson r)."""
    x = samples.astype(np.float64) / 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    banded = np.stack([b.mean(axis=1) for b in np.array_split(power, bands, axis=1)], axis=1)
    m = np.log(banded + 1e-10).mean(axis=0)
    return m - m.mean()


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_builtin_speech_same_word_alike_across_speakers_different_words_differ() -> None:
    speakers = sorted(make_speakers(12, seed=0), key=lambda s: s.f0)
    low, high = speakers[0], speakers[-1]
    assert high.f0 > 1.5 * low.f0
    words = ["circle", "square", "triangle", "star", "red", "blue", "green", "left", "top",
             "background"]

    def spectrum(word: str, speaker) -> np.ndarray:
        return mean_log_spectrum(speak_builtin(word, speaker, np.random.default_rng(7), 4.0))

    at_low = {w: spectrum(w, low) for w in words}
    at_high = {w: spectrum(w, high) for w in words}
    same = [similarity(at_low[w], at_high[w]) for w in words]
    for i, w in enumerate(words):
        others = [similarity(at_low[w], at_low[v]) for v in words if v != w]
        assert same[i] > max(others), (w, same[i], max(others))
    assert np.mean(same) > 0.8


def test_builtin_speech_is_deterministic_and_length_capped() -> None:
    speaker = make_speakers(3, seed=1)[0]
    text = ("There is a small red circle on the left and a large blue square on the right "
            "against a striped grey background .")
    a = speak_builtin(text, speaker, np.random.default_rng(1), 4.0)
    b = speak_builtin(text, speaker, np.random.default_rng(1), 4.0)
    short = speak_builtin(text, speaker, np.random.default_rng(1), 2.0)
    assert a.dtype == np.int16 and np.array_equal(a, b)
    assert len(a) <= 4.0 * 16000 + 64 and len(short) <= 2.0 * 16000 + 64
    assert len(short) < len(a)


def test_espeak_engine_writes_16k_mono_pcm16(tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    counts = synth_corpus(tmp_path / "e", n_images=8, seed=0, progress=False, engine="espeak",
                          workers=1)
    assert counts["engine"] == "espeak"
    wav_dir = tmp_path / "e" / "flickr_audio" / "wavs"
    wavs = sorted(wav_dir.glob("*.wav"))
    assert len(wavs) == counts["wavs"] > 0
    for path in wavs[:5]:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.5 <= info.duration <= 4.0 + 1e-3
    # The longest caption template must fit the cap by speaking faster, not by being cut.
    speaker = make_speakers(1, seed=0)[0]
    text = ("There is a small red circle on the left and a large blue square on the right "
            "against a striped grey background .")
    first = speak_espeak(text, speaker, 3.0)
    assert np.array_equal(first, speak_espeak(text, speaker, 3.0))
    assert len(first) < 3.0 * 16000
    tail = first[-800:].astype(float)  # the last 50 ms: trailing silence, not a cut word
    assert np.abs(tail).max() < 0.05 * np.abs(first).max()


def test_a_run_cut_short_leaves_no_caption_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_speak(*args: object) -> np.ndarray:
        calls.append(args)
        if len(calls) > 3:
            raise NlmmError("speech engine failed")
        return np.zeros(1600, dtype=np.int16)

    monkeypatch.setattr("nlmm.data.synth.speak", failing_speak)
    with pytest.raises(NlmmError, match="speech engine failed"):
        synth_corpus(tmp_path / "c", n_images=8, progress=False, engine="builtin", workers=1)
    assert not (tmp_path / "c" / "Flickr8k_text").exists()
    assert not (tmp_path / "c" / "flickr_audio" / "wav2capt.txt").exists()
