"""Flickr8k + Flickr Audio Caption Corpus (FACC) in their public on-disk layout.

`Flickr8k_Dataset/*.jpg` (or the zip's misspelled `Flicker8k_Dataset/`),
`Flickr8k_text/Flickr8k.token.txt` (`<image>#<n><TAB><caption>`),
`Flickr_8k.{train,dev,test}Images.txt`, and optionally `flickr_audio/wavs/*.wav` with
`flickr_audio/wav2capt.txt` (`<wav> <image> #<n>`): each caption's own reading.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nlmm.data.corpora.base import (IMAGE_SUFFIXES, Caption, Corpus, CorpusSpec, Defect, Group,
                                    list_files, read_lines, where)
from nlmm.errors import NlmmError

NAME = "flickr8k"
LOOKS_FOR = "Flickr8k_text/Flickr8k.token.txt and the Flickr_8k.*Images.txt split files"
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
# The zip unpacks to the misspelled folder; some people move it under the documented name.
IMAGE_DIRS = ("Flickr8k_Dataset/Flicker8k_Dataset", "Flickr8k_Dataset/Flickr8k_Dataset",
              "Flickr8k_Dataset", "Flicker8k_Dataset")
TEXT_DIRS = ("Flickr8k_text", ".")
AUDIO_DIR = "flickr_audio"
GET_DATA_HINT = ("run `nlmm data download flickr8k`, or `nlmm data synth` for a small offline "
                 "corpus")


@dataclass
class CorpusLayout:
    """Where each part of the corpus was found under the root."""

    image_dir: Path
    token_file: Path
    split_files: dict[str, Path]
    audio_dir: Path | None
    wav_dir: Path | None
    wav2capt: Path | None

    def text_files(self) -> list[Path]:
        return [self.token_file, *self.split_files.values()] + \
            ([self.wav2capt] if self.wav2capt is not None else [])


def _first_dir(root: Path, candidates: tuple[str, ...]) -> Path | None:
    found = [root / c for c in candidates if (root / c).is_dir()]
    with_images = [d for d in found if any(list_files(d, IMAGE_SUFFIXES))]
    return (with_images or found or [None])[0]


def find_text_dir(root: Path) -> Path | None:
    """The folder under `root` holding the caption file, or None when there is none."""
    return next((root / d for d in TEXT_DIRS if (root / d / TOKEN_FILE).is_file()), None)


def detect(root: Path) -> bool:
    """Any part of the layout marks it: a folder holding only some of the parts is still a
    Flickr8k corpus, whose reader then names the missing file."""
    return root.is_dir() and (find_text_dir(root) is not None
                              or any((root / d).is_dir() for d in (*IMAGE_DIRS, "Flickr8k_text")))


def find_layout(root: Path) -> CorpusLayout:
    """Locate the corpus parts under `root`; NlmmError naming what to place where if missing."""
    root = Path(root)
    if not root.is_dir():
        raise NlmmError(f"corpus folder {root} does not exist; {GET_DATA_HINT}.")
    image_dir = _first_dir(root, IMAGE_DIRS)
    if image_dir is None:
        raise NlmmError(f"no image folder under {root}: place the JPEGs in {root}/Flickr8k_Dataset/ "
                        f"(the zip's Flicker8k_Dataset/ is accepted too); {GET_DATA_HINT}.")
    text_dir = find_text_dir(root)
    if text_dir is None:
        raise NlmmError(f"caption file {TOKEN_FILE} not found: place it in "
                        f"{root}/Flickr8k_text/; {GET_DATA_HINT}.")
    split_files = {s: text_dir / name for s, name in SPLIT_FILES.items()}
    for split, path in split_files.items():
        if not path.is_file():
            raise NlmmError(f"{split} split file {path.name} not found: place it in {text_dir}/; "
                            f"{GET_DATA_HINT}.")
    audio_dir = root / AUDIO_DIR if (root / AUDIO_DIR).is_dir() else None
    wav_dir = wav2capt = None
    if audio_dir is not None:
        wav_dir = audio_dir / "wavs" if (audio_dir / "wavs").is_dir() else None
        wav2capt = audio_dir / "wav2capt.txt" if (audio_dir / "wav2capt.txt").is_file() else None
    return CorpusLayout(image_dir, text_dir / TOKEN_FILE, split_files, audio_dir, wav_dir, wav2capt)


def named_images(text_dir: Path) -> set[str]:
    """Every image file name that the caption file and the split files in `text_dir` name.

    Lines that name no image file (malformed, or the known `.jpg.1` defect) name nothing here;
    `read` reports them.
    """
    names: set[str] = set()
    for _, line in read_lines(text_dir / TOKEN_FILE):
        name = line.partition("\t")[0].strip().rpartition("#")[0]
        if name.lower().endswith(IMAGE_SUFFIXES):
            names.add(name)
    for split_file in SPLIT_FILES.values():
        if (text_dir / split_file).is_file():
            names.update(name for _, name in read_lines(text_dir / split_file))
    return names


def named_wavs(wav2capt: Path) -> set[str]:
    """Every wav file name that FACC's `wav2capt.txt` names (its first field)."""
    return {line.split()[0] for _, line in read_lines(wav2capt)}


def _parse_splits(layout: CorpusLayout, on_disk: set[str], defects: list[Defect]) -> dict[str, str]:
    assigned: dict[str, str] = {}
    for split, path in layout.split_files.items():
        for lineno, name in read_lines(path):
            if name not in on_disk:
                defects.append(Defect("missing_image", name, f"listed in {path.name} (line "
                                      f"{lineno}) but not in {layout.image_dir.name}/"))
            elif name in assigned:
                defects.append(Defect("duplicate", where(path, lineno), f"{name} is already in "
                                      f"the {assigned[name]} split; kept there"))
            else:
                assigned[name] = split
    return assigned


def _parse_captions(layout: CorpusLayout, on_disk: set[str], defects: list[Defect]) -> list[Caption]:
    path = layout.token_file
    captions: list[Caption] = []
    seen: set[tuple[str, int]] = set()
    missing: Counter[str] = Counter()
    for lineno, line in read_lines(path):
        key, tab, text = line.partition("\t")
        name, hash_, index = key.strip().rpartition("#")
        text = text.strip()
        if not tab or not hash_ or not index.isdigit() or not name:
            defects.append(Defect("malformed_line", where(path, lineno),
                                  "expected '<image>#<n><TAB><caption>'; line skipped"))
        elif not text:
            defects.append(Defect("malformed_line", where(path, lineno),
                                  "caption text is empty; line skipped"))
        elif not name.lower().endswith(IMAGE_SUFFIXES):
            defects.append(Defect("bad_image_name", where(path, lineno),
                                  f"names {name!r}, which is not an image file name (a known "
                                  f"Flickr8k defect); line skipped"))
        elif (name, int(index)) in seen:
            defects.append(Defect("duplicate", where(path, lineno),
                                  f"caption #{index} of {name} appears twice; first kept"))
        elif name not in on_disk:
            seen.add((name, int(index)))
            missing[name] += 1
        else:
            seen.add((name, int(index)))
            captions.append(Caption(name, int(index), text))
    for name, n in missing.items():
        defects.append(Defect("missing_image", name, f"{n} caption(s) in {path.name} name it but "
                              f"it is not in {layout.image_dir.name}/; captions skipped"))
    return captions


def _attach_audio(root: Path, layout: CorpusLayout, captions: list[Caption],
                  defects: list[Defect]) -> None:
    if layout.audio_dir is None:
        defects.append(Defect("no_audio", f"{AUDIO_DIR}/", f"audio folder {root / AUDIO_DIR} not "
                              f"found; the corpus is used for image-text pairs only"))
        return
    if layout.wav_dir is None or layout.wav2capt is None:
        absent = "wavs/ folder" if layout.wav_dir is None else "wav2capt.txt"
        defects.append(Defect("no_audio", f"{AUDIO_DIR}/", f"{absent} not found in "
                              f"{layout.audio_dir}; the corpus is used for image-text pairs only"))
        return
    wavs = set(list_files(layout.wav_dir, (".wav",)))
    by_key = {(c.group, c.index): c for c in captions}
    path = layout.wav2capt
    for lineno, line in read_lines(path):
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("#") or not parts[2][1:].isdigit():
            defects.append(Defect("malformed_line", where(path, lineno),
                                  "expected '<wav> <image>.jpg #<n>'; line skipped"))
            continue
        wav, image, index = parts[0], parts[1], int(parts[2][1:])
        caption = by_key.get((image, index))
        if wav not in wavs:
            defects.append(Defect("missing_wav", wav, f"named in {path.name} (line {lineno}) but "
                                  f"not in {layout.wav_dir.name}/; caption kept without audio"))
        elif caption is None:
            defects.append(Defect("unknown_caption", where(path, lineno),
                                  f"{wav} is mapped to caption #{index} of {image}, which the "
                                  f"corpus does not have; wav unused"))
        elif caption.audio is not None:
            defects.append(Defect("duplicate", where(path, lineno),
                                  f"caption #{index} of {image} already has {caption.audio.name}; "
                                  f"{wav} unused"))
        else:
            caption.audio = layout.wav_dir / wav


def read(spec: CorpusSpec) -> Corpus:
    """Parse the corpus text files and folder listings (nothing is decoded)."""
    root = Path(spec.path)
    layout = find_layout(root)
    defects: list[Defect] = []
    on_disk = set(list_files(layout.image_dir, IMAGE_SUFFIXES))
    assigned = _parse_splits(layout, on_disk, defects)
    captions = _parse_captions(layout, on_disk, defects)
    _attach_audio(root, layout, captions, defects)
    captioned = {c.group for c in captions}
    for name in sorted(set(assigned) - captioned):
        defects.append(Defect("no_caption", name, f"in the {assigned[name]} split but has no "
                              f"caption in {layout.token_file.name}; usable for nothing"))
    groups = [Group(name, assigned.get(name), image=layout.image_dir / name)
              for name in sorted(on_disk)]
    captions.sort(key=lambda c: (c.group, c.index))
    return Corpus(root, NAME, groups, captions, defects, sources=layout.text_files())
