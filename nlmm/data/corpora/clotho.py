"""Clotho: `clotho_captions_{development,validation,evaluation}.csv` (file_name, caption_1..5)
and the WAVs of each split in `development/` (or `clotho_audio_development/`, `audio/...`).

development is the train split, validation dev, evaluation test. A group is a clip, id
`<clotho split>/<file_name>` (file names repeat across Clotho's splits); its captions are
numbered 0..n-1 over the non-empty caption cells.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nlmm.data.corpora.base import (AUDIO_SUFFIXES, Caption, Corpus, CorpusSpec, Defect, Group,
                                    list_files, split_name)
from nlmm.errors import NlmmError

NAME = "clotho"
LOOKS_FOR = "clotho_captions_development.csv / _validation.csv / _evaluation.csv and the WAVs"
SPLITS = ("development", "validation", "evaluation")
CSV_DIRS = (".", "csv", "metadata")
AUDIO_DIRS = ("{split}", "clotho_audio_{split}", "audio/{split}")


def _csv_files(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in SPLITS:
        path = next((root / d / f"clotho_captions_{split}.csv" for d in CSV_DIRS
                     if (root / d / f"clotho_captions_{split}.csv").is_file()), None)
        if path is not None:
            found[split] = path
    return found


def detect(root: Path) -> bool:
    return root.is_dir() and bool(_csv_files(root))


def _read_split(root: Path, split: str, path: Path, groups: list[Group],
                captions: list[Caption], defects: list[Defect]) -> None:
    audio_dir = next((root / d.format(split=split) for d in AUDIO_DIRS
                      if (root / d.format(split=split)).is_dir()), None)
    on_disk = set(list_files(audio_dir, AUDIO_SUFFIXES)) if audio_dir is not None else set()
    seen: set[str] = set()
    absent = 0
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        cap_cols = [c for c in fields if c.startswith("caption_")]
        if "file_name" not in fields or not cap_cols:
            raise NlmmError(f"{path} has no file_name and caption_1..caption_5 columns (its "
                            f"header is {','.join(fields)}); use Clotho's CSVs as they are.")
        for row in reader:
            name = (row["file_name"] or "").strip()
            gid = f"{split}/{name}"
            if audio_dir is None:
                absent += 1
                continue
            if name not in on_disk:
                defects.append(Defect("missing_audio", gid, f"listed in {path.name} (line "
                                      f"{reader.line_num}) but not in {audio_dir}/; skipped"))
                continue
            if gid in seen:
                defects.append(Defect("duplicate", gid, f"listed twice in {path.name} (line "
                                      f"{reader.line_num}); first kept"))
                continue
            seen.add(gid)
            texts = []
            for col in cap_cols:
                text = (row[col] or "").strip()
                if text:
                    texts.append(text)
                else:
                    defects.append(Defect("empty_caption", f"{gid} {col}",
                                          f"empty in {path.name}; caption skipped"))
            groups.append(Group(gid, split_name(split), audio=audio_dir / name))
            captions.extend(Caption(gid, i, t) for i, t in enumerate(texts))
    if absent:
        # A split not unzipped at all is one defect, not one per clip.
        defects.append(Defect("missing_audio", f"{split}/", f"{absent} clips of {path.name} "
                              f"belong in {root}/{split}/ (or clotho_audio_{split}/), which "
                              f"does not exist; skipped"))


def read(spec: CorpusSpec) -> Corpus:
    root = Path(spec.path)
    files = _csv_files(root)
    if not files:
        raise NlmmError(f"no Clotho caption file under {root}: place "
                        f"clotho_captions_development.csv (and _validation, _evaluation) from "
                        f"zenodo.org/records/4783391 in {root}/.")
    groups: list[Group] = []
    captions: list[Caption] = []
    defects: list[Defect] = []
    for split, path in files.items():
        _read_split(root, split, path, groups, captions, defects)
    notes = [f"no clotho_captions_{s}.csv: the {split_name(s)} split is empty"
             for s in SPLITS if s not in files]
    return Corpus(root, NAME, groups, captions, defects, sources=list(files.values()),
                  notes=notes)
