"""LibriSpeech: split folders (train-clean-100, dev-clean, test-other, ...) holding
`<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` ("<utt-id> TRANSCRIPT" lines) and
`<utt-id>.flac` beside it.

train-* is the train split, dev-* dev, test-* test. A group is an utterance (id: the utterance
id), its audio the FLAC, its one caption the transcript.
"""

from __future__ import annotations

import os
from pathlib import Path

from nlmm.data.corpora.base import Caption, Corpus, CorpusSpec, Defect, Group, read_lines, where
from nlmm.errors import NlmmError

NAME = "librispeech"
LOOKS_FOR = "LibriSpeech split folders (train-clean-100, dev-clean, test-clean, ...)"
SPLIT_DIRS = {"train-clean-100": "train", "train-clean-360": "train", "train-other-500": "train",
              "dev-clean": "dev", "dev-other": "dev", "test-clean": "test", "test-other": "test"}


def _split_dirs(root: Path) -> list[Path]:
    for base in (root / "LibriSpeech", root):
        found = [base / d for d in SPLIT_DIRS if (base / d).is_dir()]
        if found:
            return found
    return []


def detect(root: Path) -> bool:
    return root.is_dir() and bool(_split_dirs(root))


def _subdirs(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if e.is_dir()), key=lambda e: e.name)


def _read_chapter(chapter: Path, split: str, groups: list[Group], captions: list[Caption],
                  defects: list[Defect], sources: list[Path]) -> None:
    speaker = chapter.parent.name
    prefix = f"{speaker}-{chapter.name}"
    with os.scandir(chapter) as it:
        names = {e.name for e in it if e.is_file()}
    trans = chapter / f"{prefix}.trans.txt"
    if trans.name not in names:
        defects.append(Defect("missing_transcript", str(chapter), f"no {trans.name} beside "
                              f"its FLACs; the chapter is skipped"))
        return
    sources.append(trans)
    seen: set[str] = set()
    for lineno, line in read_lines(trans):
        utt, _, text = line.partition(" ")
        if not utt.startswith(prefix + "-") or not text.strip():
            defects.append(Defect("malformed_line", where(trans, lineno),
                                  f"expected '{prefix}-<n> TRANSCRIPT'; skipped"))
        elif utt in seen:
            defects.append(Defect("duplicate", where(trans, lineno), f"{utt} appears twice; "
                                  f"first kept"))
        elif f"{utt}.flac" not in names:
            defects.append(Defect("missing_audio", f"{utt}.flac", f"named in {trans.name} "
                                  f"(line {lineno}) but not in {chapter}/; skipped"))
        else:
            seen.add(utt)
            groups.append(Group(utt, split, audio=chapter / f"{utt}.flac"))
            # LibriSpeech transcripts are all upper case; queries are typed in lower case and
            # the other corpora's captions are mixed case, so one casing keeps tokens shared.
            captions.append(Caption(utt, 0, text.strip().lower()))


def read(spec: CorpusSpec) -> Corpus:
    root = Path(spec.path)
    split_dirs = _split_dirs(root)
    if not split_dirs:
        raise NlmmError(f"no LibriSpeech split folder under {root}: untar train-clean-100.tar.gz "
                        f"(and dev-clean, test-clean) from openslr.org/12 in {root}/.")
    groups: list[Group] = []
    captions: list[Caption] = []
    defects: list[Defect] = []
    sources: list[Path] = []
    for split_dir in split_dirs:
        for speaker in _subdirs(split_dir):
            for chapter in _subdirs(Path(speaker.path)):
                _read_chapter(Path(chapter.path), SPLIT_DIRS[split_dir.name], groups, captions,
                              defects, sources)
    notes = ["splits: " + ", ".join(f"{d.name} -> {SPLIT_DIRS[d.name]}" for d in split_dirs)]
    notes += [f"no {s}-* folder: the {s} split is empty" for s in ("train", "dev", "test")
              if s not in {SPLIT_DIRS[d.name] for d in split_dirs}]
    return Corpus(root, NAME, groups, captions, defects, sources=sources, notes=notes)
