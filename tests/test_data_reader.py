"""The Flickr8k + FACC reader and `check_corpus` on hand-written corpora in the public layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from corpus_factory import PublicCorpus, write_public_corpus
from rich.console import Console

from nlmm.data.check import check_corpus
from nlmm.data.corpora import read_corpus
from nlmm.errors import NlmmError


@pytest.fixture
def corpus_copy(tiny_corpus: PublicCorpus, tmp_path: Path) -> PublicCorpus:
    """A private copy of the session corpus that a test may edit."""
    root = tmp_path / "flickr8k"
    shutil.copytree(tiny_corpus.root, root, ignore=shutil.ignore_patterns(".nlmm_cache"))
    return PublicCorpus(root, dict(tiny_corpus.split_of), dict(tiny_corpus.captions),
                        dict(tiny_corpus.wavs), dict(tiny_corpus.tone_hz))


def token_file(root: Path) -> Path:
    return root / "Flickr8k_text" / "Flickr8k.token.txt"


def wav2capt(root: Path) -> Path:
    return root / "flickr_audio" / "wav2capt.txt"


def expected_counts(corpus: PublicCorpus, audio: bool = True) -> dict[str, dict[str, int]]:
    out = {}
    for split in ("train", "dev", "test"):
        images = corpus.images_in(split)
        caps = sum(len(corpus.captions[i]) for i in images)
        wavs = sum((i, n) in corpus.wavs for i in images for n in range(len(corpus.captions[i])))
        out[split] = {"images": len(images), "clips": 0, "captions": caps, "wavs": wavs if audio else 0,
                      "triples": wavs if audio else 0, "pairs": caps}
    out["total"] = {k: sum(out[s][k] for s in ("train", "dev", "test")) for k in out["train"]}
    return out


def render(report) -> str:
    console = Console(record=True, width=200)
    console.print(report.to_table())
    return console.export_text()


def test_exact_counts_on_hand_made_corpus(tiny_corpus: PublicCorpus) -> None:
    corpus = read_corpus(tiny_corpus.root)
    assert corpus.defects == []
    assert {img.id: img.split for img in corpus.groups} == tiny_corpus.split_of
    assert len(corpus.captions) == 13 * 5
    for cap in corpus.captions:
        assert cap.text == tiny_corpus.captions[cap.group][cap.index]
    report = check_corpus(tiny_corpus.root, decode=False)
    assert report.counts == expected_counts(tiny_corpus)
    assert report.counts["train"] == {"images": 6, "clips": 0, "captions": 30, "wavs": 30, "triples": 30,
                                      "pairs": 30}
    assert report.unassigned_images == 1 and report.usable and report.defects == []


def test_decoding_check_in_a_process_pool_finds_no_defect_in_good_files(
        tiny_corpus: PublicCorpus) -> None:
    report = check_corpus(tiny_corpus.root, decode=True, workers=2)
    assert report.defects == []
    assert report.counts == expected_counts(tiny_corpus)


def test_wav2capt_third_field_is_the_caption_index_without_hash(corpus_copy: PublicCorpus) -> None:
    # Remap the wavs of one image in reverse (#0 <- _4.wav ...) to prove the index comes from
    # the third field, not from the wav's file name or the line order.
    image = corpus_copy.images_in("dev")[0]
    lines = wav2capt(corpus_copy.root).read_text().splitlines()
    kept = [ln for ln in lines if ln.split()[1] != image]
    remapped = [f"{image[:-4]}_{4 - n}.wav {image} #{n}" for n in range(5)]
    wav2capt(corpus_copy.root).write_text("\n".join(remapped + kept) + "\n")
    corpus = read_corpus(corpus_copy.root)
    assert corpus.defects == []
    wav_of = {(c.group, c.index): c.audio.name for c in corpus.captions if c.audio}
    for n in range(5):
        assert wav_of[(image, n)] == f"{image[:-4]}_{4 - n}.wav"
    other = corpus_copy.images_in("train")[2]
    assert wav_of[(other, 3)] == corpus_copy.wavs[(other, 3)]


def test_malformed_wav2capt_lines_are_reported(corpus_copy: PublicCorpus) -> None:
    image = corpus_copy.images_in("train")[0]
    path = wav2capt(corpus_copy.root)
    lines = [ln for ln in path.read_text().splitlines() if ln.split()[1] != image]
    lines += [f"{image[:-4]}_0.wav {image} 0",           # index without '#'
              f"{image[:-4]}_1.wav {image}",              # field missing
              f"{image[:-4]}_2.wav {image} #x",           # not a number
              f"{image[:-4]}_3.wav {image} #7",           # no caption #7
              f"nosuchfile_0.wav {image} #4"]             # wav not on disk
    path.write_text("\n".join(lines) + "\n")
    corpus = read_corpus(corpus_copy.root)
    kinds = sorted(d.kind for d in corpus.defects)
    assert kinds == ["malformed_line"] * 3 + ["missing_wav", "unknown_caption"]
    assert all(c.audio is None for c in corpus.captions if c.group == image)
    report = check_corpus(corpus_copy.root, decode=False)
    assert report.counts["train"]["pairs"] == 30
    assert report.counts["train"]["triples"] == 25


def test_jpg1_defect_line_is_reported_and_skipped(corpus_copy: PublicCorpus) -> None:
    path = token_file(corpus_copy.root)
    lines = path.read_text().splitlines()
    lines.insert(7, "2258277193_586949ec62.jpg.1#0\tA dog runs across the grass .")
    path.write_text("\n".join(lines) + "\n")
    corpus = read_corpus(corpus_copy.root)
    assert len(corpus.captions) == 65
    assert [(d.kind, d.item) for d in corpus.defects] == [("bad_image_name",
                                                           "Flickr8k.token.txt:8")]
    assert "2258277193_586949ec62.jpg.1" in corpus.defects[0].reason
    assert "2258277193_586949ec62.jpg.1" in render(check_corpus(corpus_copy.root, decode=False))


@pytest.mark.parametrize("folder", ["Flicker8k_Dataset", "Flickr8k_Dataset/Flicker8k_Dataset"])
def test_misspelled_image_folder_is_accepted(tmp_path: Path, folder: str) -> None:
    written = write_public_corpus(tmp_path / "c", n_images=5, splits=(2, 1, 1), audio=False,
                                  image_folder=folder)
    corpus = read_corpus(written.root)
    assert {g.image.parent for g in corpus.groups} == {written.root / folder}
    assert {img.id: img.split for img in corpus.groups} == written.split_of
    assert check_corpus(written.root).counts["train"]["pairs"] == 10


def test_corpus_without_audio_gives_image_text_pairs(tmp_path: Path) -> None:
    written = write_public_corpus(tmp_path / "c", n_images=5, splits=(2, 1, 1), audio=False)
    report = check_corpus(written.root)
    assert report.counts == expected_counts(written, audio=False)
    assert report.counts["total"]["pairs"] == 20 and report.counts["total"]["triples"] == 0
    assert [d.kind for d in report.defects] == ["no_audio"] and report.usable


def test_image_without_audio_keeps_its_pairs(corpus_copy: PublicCorpus) -> None:
    image = corpus_copy.images_in("test")[1]
    path = wav2capt(corpus_copy.root)
    path.write_text("".join(ln + "\n" for ln in path.read_text().splitlines()
                            if ln.split()[1] != image))
    report = check_corpus(corpus_copy.root, decode=False)
    assert report.defects == []
    assert report.counts["test"] == {"images": 3, "clips": 0, "captions": 15, "wavs": 10, "triples": 10,
                                     "pairs": 15}


def test_captions_and_split_entries_naming_missing_images(corpus_copy: PublicCorpus) -> None:
    with token_file(corpus_copy.root).open("a") as fh:
        fh.write("999_gone.jpg#0\tA cat .\n999_gone.jpg#1\tA cat again .\n")
    with (corpus_copy.root / "Flickr8k_text" / "Flickr_8k.devImages.txt").open("a") as fh:
        fh.write("998_alsogone.jpg\n")
    with token_file(corpus_copy.root).open("a") as fh:
        fh.write("no tab and no hash here\n")
    corpus = read_corpus(corpus_copy.root)
    got = {(d.kind, d.item) for d in corpus.defects}
    assert got == {("missing_image", "999_gone.jpg"), ("missing_image", "998_alsogone.jpg"),
                   ("malformed_line", "Flickr8k.token.txt:68")}
    assert check_corpus(corpus_copy.root, decode=False).counts["dev"]["images"] == 3


@pytest.mark.parametrize("relpath, named", [
    ("Flickr8k_text/Flickr8k.token.txt", "Flickr8k.token.txt"),
    ("Flickr8k_text/Flickr_8k.devImages.txt", "Flickr_8k.devImages.txt"),
    ("Flickr8k_Dataset", "Flickr8k_Dataset"),
])
def test_missing_required_file_is_an_error_naming_it(corpus_copy: PublicCorpus, relpath: str,
                                                     named: str) -> None:
    target = corpus_copy.root / relpath
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(NlmmError) as err:
        read_corpus(corpus_copy.root)
    assert named in str(err.value)
    assert "nlmm data download flickr8k" in str(err.value) and "nlmm data synth" in str(err.value)


def test_nothing_usable_is_reported(corpus_copy: PublicCorpus) -> None:
    (corpus_copy.root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_text("")
    report = check_corpus(corpus_copy.root, decode=False)
    assert not report.usable
    assert "nothing usable" in render(report)
