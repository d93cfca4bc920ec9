"""The corpus adapters against tiny corpora written in each public layout (corpus_layouts).

Expectations come from what the builders wrote, never from the readers.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from corpus_factory import write_public_corpus
from corpus_layouts import (BUILDERS, MP3, Written, picture, sound, write_audiocaps, write_clotho,
                            write_coco, write_commonvoice, write_csv, write_karpathy,
                            write_librispeech, write_openclip_csv)

from nlmm.data.corpora import (audiocaps, clotho, coco, commonvoice, karpathy, librispeech,
                               manifest)
from nlmm.data.corpora.base import SPLITS, Corpus, CorpusSpec
from nlmm.errors import NlmmError

MODULES = {m.NAME: m for m in (karpathy, coco, audiocaps, clotho, librispeech, commonvoice,
                               manifest)}
COLUMNS = {"manifest-parquet": {"text": "texts"}}
needs_mp3 = pytest.mark.skipif(not MP3, reason="this libsndfile cannot write MP3 (needs >= 1.1), "
                                               "so no Common Voice clips can be made")


def layout_params() -> list:
    return [pytest.param(name, marks=needs_mp3) if name == "commonvoice" else name
            for name in BUILDERS]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    """Every layout, written once for the module (read-only for the tests)."""
    out = {}
    for name, build in BUILDERS.items():
        if name == "commonvoice" and not MP3:
            continue
        root = tmp_path_factory.mktemp(name)
        out[name] = build(root)
    flickr = tmp_path_factory.mktemp("flickr8k")
    write_public_corpus(flickr, n_images=4, splits=(2, 1, 1), audio=False)
    out["flickr8k"] = Written(flickr, "flickr8k")
    return out


def read(written: Written, name: str) -> Corpus:
    return MODULES[written.format].read(CorpusSpec(written.path, columns=COLUMNS.get(name, {})))


def captions_by_group(corpus: Corpus) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in sorted(corpus.captions, key=lambda c: (c.group, c.index)):
        out.setdefault(c.group, []).append(c.text)
    return out


# --------------------------------------------------------------------------- every adapter

@pytest.mark.parametrize("name", layout_params() + ["flickr8k"])
def test_detect_recognises_only_its_own_layout(layouts: dict[str, Written], name: str) -> None:
    written = layouts[name]
    assert {n for n, m in MODULES.items() if m.detect(written.path)} == \
        ({written.format} & set(MODULES))


@pytest.mark.parametrize("name", layout_params())
def test_read_returns_what_was_written(layouts: dict[str, Written], name: str) -> None:
    written = layouts[name]
    corpus = read(written, name)
    assert corpus.format == written.format
    assert {g.id: g.split for g in corpus.groups} == written.groups
    assert len({g.id for g in corpus.groups}) == len(corpus.groups)
    assert captions_by_group(corpus) == written.captions
    for split in SPLITS:
        assert len(corpus.split_groups(split)) == written.count(split)
    per_group = Counter(c.group for c in corpus.captions)
    assert sorted((c.group, c.index) for c in corpus.captions) == \
        sorted((g, i) for g, n in per_group.items() for i in range(n))
    assert all((g.image is not None) == written.image for g in corpus.groups)
    assert all((g.audio is not None) == written.audio for g in corpus.groups)
    assert all(c.audio is None for c in corpus.captions)
    assert all(p.is_file() for p in corpus.media_paths())
    assert corpus.sources and all(p.is_file() for p in corpus.sources)


@pytest.mark.parametrize("name", layout_params())
def test_known_defects_are_reported_with_their_kind(layouts: dict[str, Written],
                                                    name: str) -> None:
    corpus = read(layouts[name], name)
    assert sorted((d.kind, d.item) for d in corpus.defects) == sorted(layouts[name].defects)
    assert all(d.reason for d in corpus.defects)


@pytest.mark.parametrize("name", ["karpathy", "coco", "audiocaps", "clotho", "librispeech",
                                  "commonvoice"])
def test_an_empty_folder_is_one_sentence_saying_what_to_place_where(tmp_path: Path,
                                                                    name: str) -> None:
    assert not MODULES[name].detect(tmp_path)
    with pytest.raises(NlmmError) as err:
        MODULES[name].read(CorpusSpec(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and message.endswith(".") and "\n" not in message


# --------------------------------------------------------------------------- Karpathy

def test_karpathy_maps_restval_to_train_and_notes_it(layouts: dict[str, Written]) -> None:
    corpus = read(layouts["karpathy-coco"], "karpathy-coco")
    raw = json.loads((layouts["karpathy-coco"].path / "data" / "dataset_coco.json").read_text())
    restval = {f"{e['filepath']}/{e['filename']}" for e in raw["images"]
               if e["split"] == "restval"} & set(layouts["karpathy-coco"].groups)
    assert restval and all(corpus.group_split()[g] == "train" for g in restval)
    assert any(f"restval: {len(restval)} images" in n for n in corpus.notes)


def test_karpathy_accepts_png_and_the_json_file_itself(layouts: dict[str, Written]) -> None:
    written = layouts["karpathy-flickr30k"]
    corpus = karpathy.read(CorpusSpec(written.path / "dataset_flickr30k.json"))
    assert any(g.image.suffix == ".png" for g in corpus.groups)
    assert {g.id for g in corpus.groups} == set(written.groups)


def test_karpathy_with_two_split_files_names_them(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    shutil.copy(tmp_path / "dataset_flickr30k.json", tmp_path / "dataset_flickr8k.json")
    with pytest.raises(NlmmError, match="dataset_flickr8k.json.*dataset_flickr30k.json.*--data"):
        karpathy.read(CorpusSpec(tmp_path))


def test_karpathy_without_its_image_folder_says_where_to_unpack(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    shutil.rmtree(tmp_path / "flickr30k-images")
    with pytest.raises(NlmmError, match="images/"):
        karpathy.read(CorpusSpec(tmp_path))


# --------------------------------------------------------------------------- COCO

def test_coco_keeps_six_and_seven_captions_in_annotation_order(
        layouts: dict[str, Written]) -> None:
    written = layouts["coco"]
    counts = Counter(c.group for c in read(written, "coco").captions)
    assert {7, 6, 5} <= set(counts.values())
    assert counts == {g: len(t) for g, t in written.captions.items()}


def test_coco_dev_is_carved_from_train_and_val_is_test(layouts: dict[str, Written],
                                                       tmp_path: Path) -> None:
    corpus = read(layouts["coco"], "coco")
    assert {g.id.split("/")[0] for g in corpus.split_groups("dev")} == {"train2017"}
    assert {g.id.split("/")[0] for g in corpus.split_groups("test")} == {"val2017"}
    assert len(corpus.split_groups("dev")) == 3   # 60 listed train images: 5%
    assert any("dev is" in n for n in corpus.notes)
    again = coco.read(CorpusSpec(layouts["coco"].path))
    assert again.group_split() == corpus.group_split()


def test_coco_prefers_2017_and_a_missing_image_folder_is_one_defect(tmp_path: Path) -> None:
    write_coco(tmp_path / "c", year="2014")
    written = write_coco(tmp_path / "c", year="2017")
    shutil.rmtree(tmp_path / "c" / "val2017")
    corpus = coco.read(CorpusSpec(tmp_path / "c"))
    assert {g.id.split("/")[0] for g in corpus.groups} == {"train2017"}
    assert any("2014" in n and "ignored" in n for n in corpus.notes)
    folder = [d for d in corpus.defects if d.item == "val2017/"]
    assert len(folder) == 1 and folder[0].kind == "missing_image"
    assert f"{written.count('test') + 1} images" in folder[0].reason


# --------------------------------------------------------------------------- AudioCaps

def test_audiocaps_counts_clips_not_downloaded_per_split(layouts: dict[str, Written]) -> None:
    corpus = read(layouts["audiocaps"], "audiocaps")
    assert "AudioCaps train: 2 of 8 clips missing (not downloaded)" in corpus.notes
    assert "AudioCaps val: 1 of 4 clips missing (not downloaded)" in corpus.notes
    assert not any(n.startswith("AudioCaps test") for n in corpus.notes)
    assert {len(t) for g, t in captions_by_group(corpus).items()
            if corpus.group_split()[g] != "train"} == {5}


def test_audiocaps_finds_clips_in_the_other_folders_and_names(tmp_path: Path) -> None:
    written = write_audiocaps(tmp_path)
    shutil.rmtree(tmp_path / "audio" / "test")
    test = [g for g, s in written.groups.items() if s == "test"]
    for i, gid in enumerate(test):
        yid, _, start = gid.rpartition("_")
        window = f"{int(start):.1f}_{int(start) + 10:.1f}"   # 30.0_40.0
        names = [f"test/{gid}.WAV", f"audio/Y{yid}.flac", f"waveforms/test/{yid}_{window}.wav"]
        sound(tmp_path / names[i % 3], i)
    corpus = audiocaps.read(CorpusSpec(tmp_path))
    assert {g.id for g in corpus.split_groups("test")} == set(test)


def test_audiocaps_csv_without_its_columns_names_the_header(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["audiocap_id", "ytid", "start", "caption"],
              [[1, "a", 0, "x"]])
    with pytest.raises(NlmmError, match="youtube_id, start_time.*ytid"):
        audiocaps.read(CorpusSpec(tmp_path))
    assert not audiocaps.detect(tmp_path / "nowhere")


# --------------------------------------------------------------------------- Clotho, LibriSpeech

def test_clotho_keeps_quoted_commas_and_file_names_with_commas(
        layouts: dict[str, Written]) -> None:
    corpus = read(layouts["clotho"], "clotho")
    assert any("," in g.id for g in corpus.groups)
    assert all(", " in c.text for c in corpus.captions)


def test_clotho_notes_a_split_without_its_csv(tmp_path: Path) -> None:
    write_clotho(tmp_path)
    (tmp_path / "clotho_captions_validation.csv").unlink()
    corpus = clotho.read(CorpusSpec(tmp_path))
    assert corpus.split_groups("dev") == []
    assert "no clotho_captions_validation.csv: the dev split is empty" in corpus.notes


def test_librispeech_transcripts_are_lower_case_and_under_a_bare_root(tmp_path: Path) -> None:
    written = write_librispeech(tmp_path / "a")
    (tmp_path / "a" / "LibriSpeech").rename(tmp_path / "b")
    corpus = librispeech.read(CorpusSpec(tmp_path / "b"))
    assert {g.id for g in corpus.groups} == set(written.groups)
    assert all(c.text == c.text.lower() and c.text for c in corpus.captions)
    assert all(g.audio.name == f"{g.id}.flac" for g in corpus.groups)


# --------------------------------------------------------------------------- Common Voice

@needs_mp3
def test_commonvoice_keeps_quotes_and_ignores_the_overlapping_tsvs(
        layouts: dict[str, Written]) -> None:
    corpus = read(layouts["commonvoice"], "commonvoice")
    assert any(c.text.startswith('"') for c in corpus.captions)
    assert "language: en" in corpus.notes
    assert any("validated.tsv" in n and "not read" in n for n in corpus.notes)
    assert {p.name for p in corpus.sources} == {"train.tsv", "dev.tsv", "test.tsv"}
    assert Counter(d.kind for d in corpus.defects) == {"empty_caption": 2, "missing_audio": 1}


@needs_mp3
def test_commonvoice_release_with_two_languages_asks_for_one(tmp_path: Path) -> None:
    written = write_commonvoice(tmp_path)
    shutil.copytree(written.path / "en", written.path / "de")
    with pytest.raises(NlmmError, match=r"2 Common Voice languages \(de, en\).*--data"):
        commonvoice.read(CorpusSpec(written.path))


# --------------------------------------------------------------------------- manifests

def test_manifest_guesses_columns_and_splits_by_hash(layouts: dict[str, Written]) -> None:
    corpus = read(layouts["manifest-openclip-csv"], "manifest-openclip-csv")
    assert "separator: comma (detected)" in corpus.notes
    assert "columns: image=filepath text=title (guessed)" in corpus.notes
    assert any("90% train / 5% dev / 5% test" in n for n in corpus.notes)
    assert any(g.image.suffix == ".png" for g in corpus.groups)


def test_manifest_in_a_folder_with_several_captions_per_image(layouts: dict[str, Written]) -> None:
    corpus = read(layouts["manifest-tsv"], "manifest-tsv")
    assert "separator: tab (detected)" in corpus.notes
    assert set(Counter(c.group for c in corpus.captions).values()) == {3}


def test_manifest_audio_without_images_is_the_groups_clip(layouts: dict[str, Written]) -> None:
    corpus = read(layouts["manifest-jsonl"], "manifest-jsonl")
    assert all(g.audio is not None and g.image is None for g in corpus.groups)


def test_manifest_audio_beside_images_is_each_captions_reading(tmp_path: Path) -> None:
    picture(tmp_path / "a.jpg", 0)
    sound(tmp_path / "a_0.wav", 0)
    sound(tmp_path / "a_1.wav", 1)
    write_csv(tmp_path / "spoken.csv", ["image", "caption", "audio", "split"],
              [["a.jpg", "a red circle", "a_0.wav", "train"],
               ["a.jpg", "something red", "a_1.wav", "train"]])
    corpus = manifest.read(CorpusSpec(tmp_path / "spoken.csv"))
    assert [g.audio for g in corpus.groups] == [None]
    assert [(c.index, c.audio.name) for c in corpus.captions] == [(0, "a_0.wav"), (1, "a_1.wav")]
    assert "no dev rows: the dev split is empty" in corpus.notes


def test_given_columns_are_noted_apart_from_guessed_ones(layouts: dict[str, Written]) -> None:
    corpus = read(layouts["manifest-parquet"], "manifest-parquet")
    assert "columns: text=texts (given), image=img split=subset (guessed)" in corpus.notes


def test_a_generic_file_column_holding_clips_is_the_audio(tmp_path: Path) -> None:
    sound(tmp_path / "a.flac", 0)   # Hugging Face audiofolder: metadata.csv with file_name
    write_csv(tmp_path / "metadata.csv", ["file_name", "transcription"], [["a.flac", "hello"]])
    corpus = manifest.read(CorpusSpec(tmp_path))
    assert "columns: text=transcription audio=file_name (guessed)" in corpus.notes
    assert [(g.id, g.image, g.audio) for g in corpus.groups] == \
        [("a.flac", None, tmp_path / "a.flac")]


def test_quoted_commas_do_not_fool_the_separator(tmp_path: Path) -> None:
    picture(tmp_path / "a.jpg", 0)
    rows = [["a.jpg", f"a dog, running, jumping, take {i}; fast"] for i in range(8)]
    for sep, name in (("\t", "tab"), (";", "semicolon"), ("|", "pipe"), (",", "comma")):
        write_csv(tmp_path / "m.txt", ["image", "caption"], rows, delimiter=sep)
        corpus = manifest.read(CorpusSpec(tmp_path / "m.txt"))
        assert f"separator: {name} (detected)" in corpus.notes
        assert [c.text for c in corpus.captions] == [r[1] for r in rows]


def test_wrong_column_names_the_columns_that_exist(layouts: dict[str, Written]) -> None:
    spec = CorpusSpec(layouts["manifest-openclip-csv"].path, columns={"text": "caption"})
    with pytest.raises(NlmmError, match=r"text=caption.*filepath, title.*--columns image="):
        manifest.read(spec)
    with pytest.raises(NlmmError, match="colour.*no role"):
        manifest.read(CorpusSpec(spec.path, columns={"colour": "title"}))


def test_manifest_without_a_text_column_says_how_to_name_it(tmp_path: Path) -> None:
    write_csv(tmp_path / "m.csv", ["filepath", "label"], [["a.jpg", "x"]])
    with pytest.raises(NlmmError, match="no text column.*filepath, label.*--columns"):
        manifest.read(CorpusSpec(tmp_path / "m.csv"))


def test_mixed_separators_are_an_error_when_most_lines_disagree(tmp_path: Path) -> None:
    picture(tmp_path / "a.jpg", 0)
    lines = ["image,caption"] + ["a.jpg,a red circle"] * 2 + ["a.jpg\ta red circle"] * 3
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(NlmmError, match=r"m.csv:4 has 1 fields.*3 of 5 lines.*one separator"):
        manifest.read(CorpusSpec(tmp_path / "m.csv"))


def test_a_few_lines_with_another_separator_are_defects(tmp_path: Path) -> None:
    picture(tmp_path / "a.jpg", 0)
    lines = ["image,caption"] + ["a.jpg,a red circle"] * 5 + ["a.jpg\ta red circle"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    corpus = manifest.read(CorpusSpec(tmp_path / "m.csv"))
    assert [(d.kind, d.item) for d in corpus.defects] == [("malformed_line", "m.csv:7")]
    assert len(corpus.captions) == 5


def test_parquet_without_pyarrow_says_how_to_install_it(layouts: dict[str, Written],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(NlmmError, match="pip install pyarrow"):
        read(layouts["manifest-parquet"], "manifest-parquet")


def test_folder_with_two_manifests_is_not_detected_and_names_them(tmp_path: Path) -> None:
    written = write_openclip_csv(tmp_path)
    shutil.copy(written.path, tmp_path / "manifest.csv")
    shutil.copy(written.path, tmp_path / "metadata.csv")
    assert not manifest.detect(tmp_path)
    with pytest.raises(NlmmError, match="manifest.csv and metadata.csv"):
        manifest.read(CorpusSpec(tmp_path))
