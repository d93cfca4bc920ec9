"""Flickr8k + Flickr Audio Caption Corpus (FACC) in their public on-disk layout.

`read_corpus` parses the text files and lists the folders (no decoding); `check_corpus` adds
per-split counts and, optionally, decodes every file to find the corrupt ones. Problems are
collected as `Defect`s with a reason instead of raised, so one bad line never stops a run;
only a missing required file is an error.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from nlmm.data.features import BadInput, load_image, read_audio
from nlmm.data.parallel import map_chunks
from nlmm.errors import NlmmError

SPLITS = ("train", "dev", "test")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
# The zip unpacks to the misspelled folder; some people move it under the documented name.
IMAGE_DIRS = ("Flickr8k_Dataset/Flicker8k_Dataset", "Flickr8k_Dataset/Flickr8k_Dataset",
              "Flickr8k_Dataset", "Flicker8k_Dataset")
TEXT_DIRS = ("Flickr8k_text", ".")
AUDIO_DIR = "flickr_audio"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
COUNT_KEYS = ("images", "captions", "wavs", "triples", "pairs")
GET_DATA_HINT = ("run `nlmm data download flickr8k`, or `nlmm data synth` for a small offline "
                 "corpus")
# Decoding images at a small size still reads every byte of the file, which is what finds
# corrupt and truncated ones, at a fraction of the cost of a full-size decode.
CHECK_IMAGE_SIZE = 32


@dataclass
class Defect:
    kind: str
    item: str
    reason: str


@dataclass
class ImageEntry:
    filename: str
    path: Path
    split: str | None


@dataclass
class CaptionEntry:
    image: str
    index: int
    text: str
    wav: Path | None


@dataclass
class CorpusLayout:
    """Where each part of the corpus was found under the root."""

    image_dir: Path
    token_file: Path
    split_files: dict[str, Path]
    audio_dir: Path | None
    wav_dir: Path | None
    wav2capt: Path | None
    wav2spk: Path | None

    def text_files(self) -> list[Path]:
        files = [self.token_file, *self.split_files.values()]
        return files + [p for p in (self.wav2capt, self.wav2spk) if p is not None]


@dataclass
class Corpus:
    root: Path
    images: list[ImageEntry]
    captions: list[CaptionEntry]
    defects: list[Defect]
    layout: CorpusLayout | None = None
    speakers: dict[str, int] = field(default_factory=dict)

    def image_split(self) -> dict[str, str | None]:
        return {img.filename: img.split for img in self.images}

    def split_images(self, split: str) -> list[ImageEntry]:
        return [img for img in self.images if img.split == split]

    def split_captions(self, split: str) -> list[CaptionEntry]:
        splits = self.image_split()
        return [cap for cap in self.captions if splits.get(cap.image) == split]

    def unassigned_images(self) -> list[ImageEntry]:
        return [img for img in self.images if img.split is None]


# --------------------------------------------------------------------------- layout

def _first_dir(root: Path, candidates: tuple[str, ...]) -> Path | None:
    found = [root / c for c in candidates if (root / c).is_dir()]
    with_images = [d for d in found if any(list_files(d, IMAGE_SUFFIXES))]
    return (with_images or found or [None])[0]


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the files in `folder` ending in one of `suffixes` (case-insensitive)."""
    with os.scandir(folder) as it:
        # "._name" files are macOS resource forks that sit beside the real ones in some zips.
        return [e.name for e in it if e.name.lower().endswith(suffixes)
                and not e.name.startswith("._") and e.is_file()]


def find_text_dir(root: Path) -> Path | None:
    """The folder under `root` holding the caption file, or None when there is none."""
    return next((root / d for d in TEXT_DIRS if (root / d / TOKEN_FILE).is_file()), None)


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
    wav_dir = wav2capt = wav2spk = None
    if audio_dir is not None:
        wav_dir = audio_dir / "wavs" if (audio_dir / "wavs").is_dir() else None
        wav2capt = audio_dir / "wav2capt.txt" if (audio_dir / "wav2capt.txt").is_file() else None
        wav2spk = audio_dir / "wav2spk.txt" if (audio_dir / "wav2spk.txt").is_file() else None
    return CorpusLayout(image_dir, text_dir / TOKEN_FILE, split_files, audio_dir, wav_dir,
                        wav2capt, wav2spk)


# --------------------------------------------------------------------------- parsing

def _lines(path: Path) -> list[tuple[int, str]]:
    # Undecodable bytes become U+FFFD rather than aborting the whole file.
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _where(path: Path, lineno: int) -> str:
    return f"{path.name}:{lineno}"


def named_images(text_dir: Path) -> set[str]:
    """Every image file name that the caption file and the split files in `text_dir` name.

    Lines that name no image file (malformed, or the known `.jpg.1` defect) name nothing here;
    `read_corpus` reports them.
    """
    names: set[str] = set()
    for _, line in _lines(text_dir / TOKEN_FILE):
        name = line.partition("\t")[0].strip().rpartition("#")[0]
        if name.lower().endswith(IMAGE_SUFFIXES):
            names.add(name)
    for split_file in SPLIT_FILES.values():
        if (text_dir / split_file).is_file():
            names.update(name for _, name in _lines(text_dir / split_file))
    return names


def named_wavs(wav2capt: Path) -> set[str]:
    """Every wav file name that FACC's `wav2capt.txt` names (its first field)."""
    return {line.split()[0] for _, line in _lines(wav2capt)}


def _parse_splits(layout: CorpusLayout, on_disk: set[str],
                  defects: list[Defect]) -> dict[str, str]:
    assigned: dict[str, str] = {}
    for split, path in layout.split_files.items():
        for lineno, name in _lines(path):
            if name not in on_disk:
                defects.append(Defect("missing_image", name, f"listed in {path.name} (line "
                                      f"{lineno}) but not in {layout.image_dir.name}/"))
            elif name in assigned:
                defects.append(Defect("duplicate", _where(path, lineno), f"{name} is already in "
                                      f"the {assigned[name]} split; kept there"))
            else:
                assigned[name] = split
    return assigned


def _parse_captions(layout: CorpusLayout, on_disk: set[str],
                    defects: list[Defect]) -> list[CaptionEntry]:
    path = layout.token_file
    captions: list[CaptionEntry] = []
    seen: set[tuple[str, int]] = set()
    missing: Counter[str] = Counter()
    for lineno, line in _lines(path):
        key, tab, text = line.partition("\t")
        name, hash_, index = key.strip().rpartition("#")
        text = text.strip()
        if not tab or not hash_ or not index.isdigit() or not name:
            defects.append(Defect("malformed_line", _where(path, lineno),
                                  "expected '<image>.jpg#<n><TAB><caption>'; line skipped"))
        elif not text:
            defects.append(Defect("malformed_line", _where(path, lineno),
                                  "caption text is empty; line skipped"))
        elif not name.lower().endswith(IMAGE_SUFFIXES):
            defects.append(Defect("bad_image_name", _where(path, lineno),
                                  f"names {name!r}, which is not an image file name (a known "
                                  f"Flickr8k defect); line skipped"))
        elif (name, int(index)) in seen:
            defects.append(Defect("duplicate", _where(path, lineno),
                                  f"caption #{index} of {name} appears twice; first kept"))
        elif name not in on_disk:
            seen.add((name, int(index)))
            missing[name] += 1
        else:
            seen.add((name, int(index)))
            captions.append(CaptionEntry(name, int(index), text, None))
    for name, n in missing.items():
        defects.append(Defect("missing_image", name, f"{n} caption(s) in {path.name} name it but "
                              f"it is not in {layout.image_dir.name}/; captions skipped"))
    return captions


def _attach_audio(root: Path, layout: CorpusLayout, captions: list[CaptionEntry],
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
    by_key = {(c.image, c.index): c for c in captions}
    path = layout.wav2capt
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("#") or not parts[2][1:].isdigit():
            defects.append(Defect("malformed_line", _where(path, lineno),
                                  "expected '<wav> <image>.jpg #<n>'; line skipped"))
            continue
        wav, image, index = parts[0], parts[1], int(parts[2][1:])
        caption = by_key.get((image, index))
        if wav not in wavs:
            defects.append(Defect("missing_wav", wav, f"named in {path.name} (line {lineno}) but "
                                  f"not in {layout.wav_dir.name}/; caption kept without audio"))
        elif caption is None:
            defects.append(Defect("unknown_caption", _where(path, lineno),
                                  f"{wav} is mapped to caption #{index} of {image}, which the "
                                  f"corpus does not have; wav unused"))
        elif caption.wav is not None:
            defects.append(Defect("duplicate", _where(path, lineno),
                                  f"caption #{index} of {image} already has {caption.wav.name}; "
                                  f"{wav} unused"))
        else:
            caption.wav = layout.wav_dir / wav


def _parse_speakers(layout: CorpusLayout, defects: list[Defect]) -> dict[str, int]:
    speakers: dict[str, int] = {}
    if layout.wav2spk is None:
        return speakers
    for lineno, line in _lines(layout.wav2spk):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            defects.append(Defect("malformed_line", _where(layout.wav2spk, lineno),
                                  "expected '<wav> <speaker id>'; line skipped"))
        else:
            speakers[parts[0]] = int(parts[1])
    return speakers


def read_corpus(root: Path) -> Corpus:
    """Parse the corpus text files and folder listings (nothing is decoded)."""
    root = Path(root)
    layout = find_layout(root)
    defects: list[Defect] = []
    on_disk = set(list_files(layout.image_dir, IMAGE_SUFFIXES))
    assigned = _parse_splits(layout, on_disk, defects)
    captions = _parse_captions(layout, on_disk, defects)
    _attach_audio(root, layout, captions, defects)
    speakers = _parse_speakers(layout, defects)
    captioned = {c.image for c in captions}
    for name in sorted(set(assigned) - captioned):
        defects.append(Defect("no_caption", name, f"in the {assigned[name]} split but has no "
                              f"caption in {layout.token_file.name}; usable for nothing"))
    images = [ImageEntry(name, layout.image_dir / name, assigned.get(name)) for name in sorted(on_disk)]
    captions.sort(key=lambda c: (c.image, c.index))
    return Corpus(root, images, captions, defects, layout, speakers)


# --------------------------------------------------------------------------- checking

def check_images_chunk(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(path, reason or None) per image: a full decode at a small size."""
    out: list[tuple[Path, str | None]] = []
    for path in paths:
        try:
            load_image(path, CHECK_IMAGE_SIZE)
            out.append((path, None))
        except BadInput as exc:
            out.append((path, str(exc)))
    return out


def check_wavs_chunk(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(path, reason or None) per audio file: read and validate every sample."""
    out: list[tuple[Path, str | None]] = []
    for path in paths:
        try:
            read_audio(path)
            out.append((path, None))
        except BadInput as exc:
            out.append((path, str(exc)))
    return out


@dataclass
class CheckReport:
    root: Path
    counts: dict[str, dict[str, int]]
    defects: list[Defect]
    unassigned_images: int
    decoded: bool

    @property
    def usable(self) -> bool:
        """Training needs at least one image-text pair in the train split."""
        return self.counts.get("train", {}).get("pairs", 0) > 0

    def defect_kinds(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.defects))

    def to_table(self, max_defects: int | None = None) -> Group:
        """Counts per split, then every defect (or the first `max_defects`) with its reason."""
        counts = Table(title=f"corpus {self.root}" + ("" if self.decoded else " (not decoded)"))
        counts.add_column("split")
        for key in COUNT_KEYS:
            counts.add_column(key, justify="right")
        for split, row in self.counts.items():
            counts.add_row(split, *(str(row[k]) for k in COUNT_KEYS),
                           style="bold" if split == "total" else None)
        parts: list[Table | Text] = [counts]
        if self.unassigned_images:
            parts.append(Text(f"{self.unassigned_images} image(s) belong to no split and are "
                              f"skipped."))
        if self.defects:
            shown = self.defects if max_defects is None else self.defects[:max_defects]
            table = Table(title=f"{len(self.defects)} defect(s): "
                                + ", ".join(f"{k} {n}" for k, n in self.defect_kinds().items()))
            table.add_column("kind")
            table.add_column("item", overflow="fold")
            table.add_column("reason", overflow="fold")
            for d in shown:
                table.add_row(d.kind, d.item, d.reason)
            parts.append(table)
            if len(shown) < len(self.defects):
                parts.append(Text(f"... and {len(self.defects) - len(shown)} more defect(s)."))
        else:
            parts.append(Text("no defects found."))
        if not self.usable:
            parts.append(Text("nothing usable: the train split has no image-caption pair.",
                              style="bold red"))
        return Group(*parts)


def tally(images: list[ImageEntry], captions: list[CaptionEntry],
          has_audio: dict[tuple[str, int], bool], image_ok: set[str]) -> dict[str, dict[str, int]]:
    """Per-split counts, plus 'total'.

    images: decodable images; captions: caption lines whose image file exists; pairs: captions
    whose image decodes; wavs: captions whose spoken version decodes; triples: both.
    """
    split_of = {img.filename: img.split for img in images}
    counts = {s: dict.fromkeys(COUNT_KEYS, 0) for s in SPLITS}
    for img in images:
        if img.split is not None and img.filename in image_ok:
            counts[img.split]["images"] += 1
    for cap in captions:
        split = split_of.get(cap.image)
        if split is None:
            continue
        audio = has_audio.get((cap.image, cap.index), False)
        good_image = cap.image in image_ok
        counts[split]["wavs"] += audio
        counts[split]["captions"] += 1
        counts[split]["pairs"] += good_image
        counts[split]["triples"] += good_image and audio
    counts["total"] = {k: sum(counts[s][k] for s in SPLITS) for k in COUNT_KEYS}
    return counts


def check_corpus(root: Path, decode: bool = True, workers: int | None = None,
                 progress: bool = False) -> CheckReport:
    """Counts per split and every defect; with `decode`, every image and wav is decoded."""
    corpus = read_corpus(root)
    defects = list(corpus.defects)
    in_split = [img for img in corpus.images if img.split is not None]
    split_names = {img.filename for img in in_split}
    audio_caps = [c for c in corpus.captions if c.wav is not None and c.image in split_names]
    image_ok = split_names
    bad_wavs: set[Path] = set()
    if decode:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("decoding images", total=len(in_split))
            bad_images: set[str] = set()
            for chunk in map_chunks(check_images_chunk, [img.path for img in in_split],
                                    workers=workers, progress=bar, task=task):
                for path, reason in chunk:
                    if reason is not None:
                        bad_images.add(path.name)
                        defects.append(Defect("bad_image", path.name, reason + "; image and its "
                                              "captions skipped"))
            image_ok = split_names - bad_images
            task = bar.add_task("decoding audio", total=len(audio_caps))
            for chunk in map_chunks(check_wavs_chunk, [c.wav for c in audio_caps],
                                    workers=workers, progress=bar, task=task):
                for path, reason in chunk:
                    if reason is not None:
                        bad_wavs.add(path)
                        defects.append(Defect("bad_audio", path.name, reason + "; caption kept "
                                              "without audio"))
    has_audio = {(c.image, c.index): c.wav not in bad_wavs for c in audio_caps}
    counts = tally(corpus.images, corpus.captions, has_audio, image_ok)
    return CheckReport(Path(root), counts, defects, len(corpus.unassigned_images()), decode)
