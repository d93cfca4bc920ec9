"""A generic manifest: one row per caption, in a CSV / TSV / TXT / JSONL / Parquet file.

Columns play roles: text (a string, or in JSONL/Parquet a list of strings), image, audio,
split and group; `--columns image=filepath,text=title` names them, and roles not named are
guessed from common column names. Paths are relative to the manifest's folder. Rows of one
group (the group column, else the image path, else the audio path) are captions of one group.
With an image column, the audio column is each caption's reading (`Caption.audio`); without
one, it is the group's clip (`Group.audio`). With no split column, a group's split is a hash
of its id (`hash_split`: 90% train, 5% dev, 5% test), stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nlmm.data.corpora.base import (AUDIO_SUFFIXES, IMAGE_SUFFIXES, SPLITS, Caption, Corpus,
                                    CorpusSpec, Defect, Group, split_name)
from nlmm.data.corpora.table import SUFFIXES, read_table
from nlmm.errors import NlmmError

NAME = "manifest"
LOOKS_FOR = ("a CSV / TSV / TXT / JSONL / Parquet manifest (the file, the folder's only such "
             "file, or manifest.csv / metadata.csv in the folder)")
STEMS = ("manifest", "metadata")
ROLES = ("image", "text", "audio", "split", "group")
GUESSES = {"image": ("filepath", "image", "image_path", "img", "file_name", "filename", "path"),
           "text": ("caption", "title", "text", "sentence", "captions", "raw", "transcription"),
           "audio": ("audio", "audio_path", "wav", "audio_file", "audio_filepath"),
           "split": ("split", "set", "subset"),
           "group": ("group", "group_id", "image_id", "clip_id")}
# Names any file (Hugging Face's audiofolder uses file_name for clips): the suffix of the first
# value says whether it is an image or a clip.
ANY_FILE = ("file_name", "filename", "path")
COLUMNS_HINT = "--columns image=<column>,text=<column> (roles: image, text, audio, split, group)"


def _candidates(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix.lower() in SUFFIXES else []
    named = [root / f"{s}{x}" for s in STEMS for x in SUFFIXES if (root / f"{s}{x}").is_file()]
    if named:
        return named
    # a folder holding one table and the media it names (open_clip's train_data.csv): that one
    tables = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
              and not p.name.startswith(".")] if root.is_dir() else []
    return tables if len(tables) == 1 else []


def detect(root: Path) -> bool:
    return len(_candidates(root)) == 1


def hash_split(group_id: str) -> str:
    h = int(hashlib.sha1(group_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 90 else "dev" if h < 95 else "test"


def _roles(path: Path, columns: list[str], rows: list[tuple[str, dict]], given: dict[str, str],
           notes: list[str]) -> dict[str, str]:
    if set(given) - set(ROLES):
        raise NlmmError(f"--columns names {', '.join(sorted(set(given) - set(ROLES)))}, which "
                        f"is no role; write {COLUMNS_HINT}.")
    for role, col in given.items():
        if col not in columns:
            raise NlmmError(f"--columns {role}={col}: {path.name} has no column {col!r}; its "
                            f"columns are {', '.join(columns)}; write {COLUMNS_HINT}.")
    by_lower = {c.strip().lower(): c for c in reversed(columns)}
    roles, guessed = dict(given), set()
    for role in ROLES:
        col = next((by_lower[g] for g in GUESSES[role]
                    if g in by_lower and by_lower[g] not in roles.values()), None)
        if role not in roles and col is not None:
            roles[role] = col
            guessed.add(role)
    image = roles.get("image", "") if "image" in guessed else ""
    first = next((str(r[image]) for _, r in rows if r.get(image)), "") if image else ""
    if (image.lower() in ANY_FILE and "audio" not in roles
            and first.lower().endswith(AUDIO_SUFFIXES)):
        roles["audio"] = roles.pop("image")
        guessed = guessed - {"image"} | {"audio"}
    if "text" not in roles:
        raise NlmmError(f"{path.name} has no text column (none is named "
                        f"{', '.join(GUESSES['text'])}); its columns are {', '.join(columns)}; "
                        f"write {COLUMNS_HINT}.")
    if "image" not in roles and "audio" not in roles:
        raise NlmmError(f"{path.name} has no image or audio column (none is named "
                        f"{', '.join(GUESSES['image'] + GUESSES['audio'])}); its columns are "
                        f"{', '.join(columns)}; write {COLUMNS_HINT}.")
    described = [" ".join(f"{r}={roles[r]}" for r in ROLES if r in names) + f" ({how})"
                 for names, how in ((set(given), "given"), (guessed, "guessed")) if names]
    notes.append("columns: " + ", ".join(described))
    return roles


class _Files:
    """Whether files exist, each folder listed once rather than each file stat'ed."""

    def __init__(self) -> None:
        self.listed: dict[Path, set[str]] = {}

    def __contains__(self, path: Path) -> bool:
        if path.parent not in self.listed:
            try:
                with os.scandir(path.parent) as it:
                    self.listed[path.parent] = {e.name for e in it if e.is_file()}
            except OSError:
                self.listed[path.parent] = set()
        return path.name in self.listed[path.parent]


def _media(value: object, role: str, base: Path, files: _Files) -> Path | Defect | None:
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    if text.lower().startswith(("http://", "https://")):
        return Defect("remote_file", text, "remote file: download it first and write its local "
                      "path in the manifest; rows skipped")
    suffixes = IMAGE_SUFFIXES if role == "image" else AUDIO_SUFFIXES
    if not text.lower().endswith(suffixes):
        return Defect("unsupported_file", text, f"not an {role} file ({', '.join(suffixes)}); "
                      f"rows skipped")
    path = Path(text) if Path(text).is_absolute() else base / text
    if path not in files:
        return Defect(f"missing_{role}", text, f"not found at {path}; rows skipped")
    return path


def _group_id(row: dict, roles: dict[str, str]) -> str:
    """The group column's value, else the image path, else the audio path, as written."""
    return next(str(row[roles[r]]).strip() for r in ("group", "image", "audio")
                if r in roles and row.get(roles[r]) not in (None, ""))


def _texts(value: object) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def read(spec: CorpusSpec) -> Corpus:
    found = _candidates(spec.path) if Path(spec.path).is_dir() else [Path(spec.path)]
    if len(found) != 1:
        raise NlmmError(f"{spec.path} holds {' and '.join(p.name for p in found) or 'no manifest'}:"
                        f" pass the manifest file itself with --data (a .csv, .tsv, .txt, .jsonl "
                        f"or .parquet file).")
    path = found[0]
    defects: list[Defect] = []
    notes: list[str] = []
    known = {g for names in GUESSES.values() for g in names} | set(spec.columns.values())
    columns, rows = read_table(path, known, defects, notes)
    roles = _roles(path, columns, rows, spec.columns, notes)
    files = _Files()
    groups: dict[str, Group] = {}
    captions: list[Caption] = []
    counts: dict[str, int] = {}
    reported: set[str] = set()
    primary = "image" if "image" in roles else "audio"
    for at, row in rows:
        media = {r: _media(row.get(roles[r]), r, path.parent, files)
                 for r in ("image", "audio") if r in roles}
        bad = [m for m in media.values() if isinstance(m, Defect)]
        if bad:
            defects += [d for d in bad if d.item not in reported]
            reported.update(d.item for d in bad)
            continue
        if media[primary] is None:
            defects.append(Defect("malformed_line", at, f"no {primary} file; row skipped"))
            continue
        texts = _texts(row.get(roles["text"]))
        if not texts:
            defects.append(Defect("empty_caption", at, "no caption text; row skipped"))
            continue
        key = _group_id(row, roles)
        split = (split_name(str(row.get(roles["split"]) or "")) if "split" in roles
                 else hash_split(key))
        if split is None:
            defects.append(Defect("unknown_split", at, f"split {row.get(roles['split'])!r} is "
                                  f"not train, dev or test (nor val, validation, ...); skipped"))
            continue
        group = Group(key, split, image=media.get("image"),
                      audio=media.get("audio") if primary == "audio" else None)
        if groups.setdefault(key, group) != group:
            defects.append(Defect("inconsistent_group", at, f"group {key} has another split or "
                                  f"file on an earlier line; row skipped"))
            continue
        # With images, a row's audio is its caption read aloud; without, it is the group's clip.
        reading = media.get("audio") if primary == "image" else None
        captions += [Caption(key, counts.get(key, 0) + i, t, reading) for i, t in enumerate(texts)]
        counts[key] = counts.get(key, 0) + len(texts)
    if "split" not in roles:
        notes.append("no split column: split by a hash of the group id, 90% train / 5% dev / "
                     "5% test")
    notes += [f"no {s} rows: the {s} split is empty" for s in SPLITS
              if not any(g.split == s for g in groups.values())]
    return Corpus(path.parent, NAME, list(groups.values()), captions, defects, sources=[path],
                  notes=notes)
