"""One interface for every corpus: groups (an image or a clip) and the captions that describe them.

A group is the thing captions belong to: a Flickr/COCO image, an AudioCaps/Clotho clip, a
LibriSpeech/Common Voice utterance. Captions of one group are positives of each other, never
negatives. A group may carry an image and/or a clip (`Group.audio`, described by every caption);
a caption carries its text and, for spoken-caption corpora (FACC), its own reading
(`Caption.audio`). Which modalities a corpus has follows from which of these are set.

Every format is a module in this package with `NAME`, `LOOKS_FOR` (what `detect` looks for, for
error messages), `detect(root) -> bool` (cheap: file names only) and `read(spec) -> Corpus`
(parses text/JSON/CSV files and lists folders; nothing is decoded). Problems are collected as
`Defect`s with a reason instead of raised, so one bad line never stops a run; only a missing
required file is an error (`NlmmError`, one sentence saying what to place where).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "dev", "test")
# How the public corpora name their splits. Karpathy's `restval` is trained on by every
# retrieval paper; Clotho's `development` is its training split.
SPLIT_NAMES = {"train": "train", "training": "train", "restval": "train", "development": "train",
               "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev",
               "test": "test", "evaluation": "test", "eval": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")


@dataclass
class Defect:
    kind: str
    item: str
    reason: str


@dataclass
class Group:
    """An image or a clip and the split it is in (None: in no split, skipped)."""

    id: str
    split: str | None
    image: Path | None = None
    audio: Path | None = None


@dataclass
class Caption:
    group: str
    index: int
    text: str
    audio: Path | None = None  # this caption spoken (FACC); a group's clip is Group.audio


@dataclass
class CorpusSpec:
    """Where a corpus is and how to read it; what `--data`, `--format` and `--columns` say.

    `path` is a folder, or a manifest file for the manifest format. `columns` maps the manifest's
    roles (image, text, audio, split, group) to column names.
    """

    path: Path
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "columns": dict(self.columns)}

    @staticmethod
    def from_dict(d: dict) -> CorpusSpec:
        return CorpusSpec(Path(d["path"]), d.get("format"), dict(d.get("columns") or {}))


@dataclass
class Corpus:
    """What an adapter read: every group and caption, and every defect found on the way.

    `sources` are the annotation files read (their bytes enter the cache's fingerprint);
    `notes` are facts worth one line in `data check` (the separator detected, say).
    """

    root: Path
    format: str
    groups: list[Group]
    captions: list[Caption]
    defects: list[Defect]
    sources: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def group_split(self) -> dict[str, str | None]:
        return {g.id: g.split for g in self.groups}

    def split_groups(self, split: str) -> list[Group]:
        return [g for g in self.groups if g.split == split]

    def split_captions(self, split: str) -> list[Caption]:
        splits = self.group_split()
        return [c for c in self.captions if splits.get(c.group) == split]

    def unassigned_groups(self) -> list[Group]:
        return [g for g in self.groups if g.split is None]

    def media_paths(self) -> Iterable[Path]:
        """Every image and audio file the corpus refers to (for fingerprints and checks)."""
        for g in self.groups:
            if g.image is not None:
                yield g.image
            if g.audio is not None:
                yield g.audio
        for c in self.captions:
            if c.audio is not None:
                yield c.audio


def split_name(raw: str) -> str | None:
    """The nlmm split (train/dev/test) of a corpus's split name, or None when unknown."""
    return SPLIT_NAMES.get(raw.strip().lower())


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of every non-blank line; undecodable bytes become U+FFFD
    rather than aborting the whole file."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def where(path: Path, lineno: int) -> str:
    return f"{path.name}:{lineno}"


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the files in `folder` ending in one of `suffixes` (case-insensitive)."""
    import os

    with os.scandir(folder) as it:
        # "._name" files are macOS resource forks that sit beside the real ones in some zips.
        return [e.name for e in it if e.name.lower().endswith(suffixes)
                and not e.name.startswith("._") and e.is_file()]
