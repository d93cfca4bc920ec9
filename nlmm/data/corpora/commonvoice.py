"""Mozilla Common Voice: `train.tsv`, `dev.tsv`, `test.tsv` (client_id, path, sentence, and
columns that vary by release) and the MP3s in `clips/`, in a language folder
(`cv-corpus-17.0-2024-03-15/en/`); the release folder itself is accepted when it holds one
language.

A group is a clip (id: its `path`), its audio the MP3, its one caption the sentence read.
validated.tsv, other.tsv and invalidated.tsv are not read: validated.tsv is a superset of the
three splits and the other two are clips the community rejected or has not reviewed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from nlmm.data.corpora.base import (AUDIO_SUFFIXES, Caption, Corpus, CorpusSpec, Defect, Group,
                                    list_files)
from nlmm.errors import NlmmError

NAME = "commonvoice"
LOOKS_FOR = "train.tsv / dev.tsv / test.tsv beside a clips/ folder (a Common Voice language)"
SPLITS = ("train", "dev", "test")
IGNORED = ("validated.tsv", "other.tsv", "invalidated.tsv")


def _is_language(folder: Path) -> bool:
    return (folder / "clips").is_dir() and any((folder / f"{s}.tsv").is_file() for s in SPLITS)


def _language_dirs(root: Path) -> list[Path]:
    if _is_language(root):
        return [root]
    with os.scandir(root) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and _is_language(Path(e.path)))


def detect(root: Path) -> bool:
    return root.is_dir() and bool(_language_dirs(root))


def read(spec: CorpusSpec) -> Corpus:
    root = Path(spec.path)
    langs = _language_dirs(root)
    if not langs:
        raise NlmmError(f"no Common Voice language folder at {root}: pass the folder holding "
                        f"train.tsv, dev.tsv, test.tsv and clips/ (e.g. cv-corpus-17.0-.../en).")
    if len(langs) > 1:
        raise NlmmError(f"{root} holds {len(langs)} Common Voice languages "
                        f"({', '.join(d.name for d in langs)}); pass one of them with --data.")
    folder = langs[0]
    clips = set(list_files(folder / "clips", AUDIO_SUFFIXES))
    groups: dict[str, Group] = {}
    captions: list[Caption] = []
    defects: list[Defect] = []
    sources: list[Path] = []
    notes = [f"language: {folder.name}"] if folder != root else []
    for split in SPLITS:
        path = folder / f"{split}.tsv"
        if not path.is_file():
            notes.append(f"no {split}.tsv: the {split} split is empty")
            continue
        sources.append(path)
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            # Sentences hold unbalanced quotes ("Hello, he said); the files are never quoted.
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, [])
            if "path" not in header or "sentence" not in header:
                raise NlmmError(f"{path} has no path and sentence columns (its header is "
                                f"{' '.join(header)}); use the release's TSVs as they are.")
            ip, isent = header.index("path"), header.index("sentence")
            for row in reader:
                item = f"{path.name}:{reader.line_num}"
                if len(row) <= max(ip, isent):
                    defects.append(Defect("malformed_line", item, f"has {len(row)} fields, the "
                                          f"header {len(header)}; skipped"))
                    continue
                clip, text = row[ip].strip(), row[isent].strip()
                if not text:
                    defects.append(Defect("empty_caption", clip or item, f"empty sentence in "
                                          f"{item}; clip skipped"))
                elif clip not in clips:
                    defects.append(Defect("missing_audio", clip or item, f"named in {item} but "
                                          f"not in {folder}/clips/; skipped"))
                elif clip in groups:
                    defects.append(Defect("duplicate", clip, f"{item} repeats a clip of the "
                                          f"{groups[clip].split} split; kept there"))
                else:
                    groups[clip] = Group(clip, split, audio=folder / "clips" / clip)
                    captions.append(Caption(clip, 0, text))
    present = [name for name in IGNORED if (folder / name).is_file()]
    if present:
        notes.append(f"{', '.join(present)} not read: they overlap train/dev/test or hold "
                     f"rejected clips")
    return Corpus(root, NAME, list(groups.values()), captions, defects, sources=sources,
                  notes=notes)
