"""AudioCaps: `{train,val,test}.csv` (audiocap_id,youtube_id,start_time,caption) and the clips
the user downloaded from YouTube.

A group is a clip, (youtube_id, start_time), id `<youtube_id>_<start>`: one caption per train
clip, five per val/test clip, numbered 0..n-1 in CSV order. val is the dev split. The CSVs
name clips that are no longer on YouTube, so every copy lacks some: a clip that is not found
is one `missing_audio` defect and a per-split count in the notes, never an error.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from nlmm.data.corpora.base import (AUDIO_SUFFIXES, Caption, Corpus, CorpusSpec, Defect, Group,
                                    list_files)
from nlmm.errors import NlmmError

NAME = "audiocaps"
LOOKS_FOR = "train.csv / val.csv / test.csv with audiocap_id,youtube_id,start_time,caption"
SPLITS = {"train": "train", "val": "dev", "test": "test"}
CSV_DIRS = (".", "csv", "dataset", "data")
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
AUDIO_DIRS = ("audio/{split}", "{split}", "audio", "waveforms/{split}", ".")


def _csv_dir(root: Path) -> Path | None:
    return next((root / d for d in CSV_DIRS
                 if any((root / d / f"{s}.csv").is_file() for s in SPLITS)), None)


def detect(root: Path) -> bool:
    # train.csv alone is too common a name: the header says whether it is AudioCaps.
    folder = _csv_dir(root) if root.is_dir() else None
    if folder is None:
        return False
    first = next(folder / f"{s}.csv" for s in SPLITS if (folder / f"{s}.csv").is_file())
    with first.open(encoding="utf-8-sig", errors="replace") as f:
        return "audiocap_id" in f.readline()


def _num(x: float) -> str:
    return str(int(x)) if x.is_integer() else str(x)


def _stems(start: float, ids: list[str], yid: str) -> list[str]:
    """Every name the download scripts in use give a clip's file (without suffix): by caption
    id, by video id, or by video id and the 10 s window (AudioSet's Y<id>_30.000_40.000)."""
    names = [*ids, yid, f"Y{yid}"]
    for fmt in (_num, "{:.1f}".format, "{:.3f}".format):
        s, e = fmt(start), fmt(start + 10)
        names += [f"{yid}_{s}", f"Y{yid}_{s}", f"{yid}_{s}_{e}", f"Y{yid}_{s}_{e}"]
    return names


class _Clips:
    """Audio files by stem in a split's folders, each folder listed once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listed: dict[Path, dict[str, str]] = {}

    def folders(self, split: str) -> list[Path]:
        return [self.root / d.format(split=split) for d in AUDIO_DIRS]

    def find(self, split: str, stems: list[str]) -> Path | None:
        for folder in self.folders(split):
            if folder not in self.listed:
                names = list_files(folder, AUDIO_SUFFIXES) if folder.is_dir() else []
                self.listed[folder] = {n.rsplit(".", 1)[0]: n for n in names}
            found = next((self.listed[folder][s] for s in stems if s in self.listed[folder]), None)
            if found is not None:
                return folder / found
        return None


def read(spec: CorpusSpec) -> Corpus:
    root = Path(spec.path)
    folder = _csv_dir(root)
    if folder is None:
        raise NlmmError(f"no AudioCaps CSV under {root}: place train.csv, val.csv and test.csv "
                        f"from github.com/cdjkim/audiocaps (dataset/) in {root}/.")
    groups: dict[str, Group] = {}
    texts: dict[str, list[str]] = {}
    defects: list[Defect] = []
    notes: list[str] = []
    sources: list[Path] = []
    clips = _Clips(root)
    for raw_split, split in SPLITS.items():
        path = folder / f"{raw_split}.csv"
        if not path.is_file():
            notes.append(f"no {raw_split}.csv: the {split} split is empty")
            continue
        sources.append(path)
        rows: dict[str, tuple[float, str, list[str], list[str]]] = {}
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            reader = csv.DictReader(f)
            absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise NlmmError(f"{path} has no {', '.join(absent)} column (its header is "
                                f"{','.join(reader.fieldnames or [])}); use the CSVs of "
                                f"github.com/cdjkim/audiocaps as they are.")
            for row in reader:
                yid, text = (row["youtube_id"] or "").strip(), (row["caption"] or "").strip()
                try:
                    start = float(row["start_time"])
                except (TypeError, ValueError):
                    start = None
                if not yid or start is None or not math.isfinite(start) or not text:
                    defects.append(Defect("malformed_line", f"{path.name}:{reader.line_num}",
                                          "needs a youtube_id, a numeric start_time and a "
                                          "caption; skipped"))
                    continue
                gid = f"{yid}_{_num(start)}"
                _, _, ids, caps = rows.setdefault(gid, (start, yid, [], []))
                ids.append((row["audiocap_id"] or "").strip())
                caps.append(text)
        missing = 0
        tried = ", ".join(f"{d.relative_to(root)}/" for d in clips.folders(raw_split))
        for gid, (start, yid, ids, caps) in rows.items():
            if gid in groups:
                defects.append(Defect("duplicate", gid, f"clip of {raw_split}.csv is already in "
                                      f"the {groups[gid].split} split; kept there"))
                continue
            audio = clips.find(raw_split, _stems(start, ids, yid))
            if audio is None:
                missing += 1
                defects.append(Defect("missing_audio", gid, f"no {yid}.wav (or Y{yid}, "
                                      f"{gid}, {ids[0]}, ... .wav/.flac) in {tried}: not "
                                      f"downloaded; its {len(caps)} caption(s) skipped"))
                continue
            groups[gid] = Group(gid, split, audio=audio)
            texts[gid] = caps
        if missing:
            notes.append(f"AudioCaps {raw_split}: {missing} of {len(rows)} clips missing "
                         f"(not downloaded)")
    captions = [Caption(gid, i, t) for gid, caps in texts.items() for i, t in enumerate(caps)]
    return Corpus(root, NAME, list(groups.values()), captions, defects, sources=sources,
                  notes=notes)
