"""MS-COCO captions as distributed: `annotations/captions_{train,val}{2017,2014}.json` and the
images in `train2017/` and `val2017/` (or under `images/`).

Splits: val is what COCO results are reported on, so it is the test split; COCO has no dev
split, so dev is carved out of train: the min(1000, 5%) train images whose id has the lowest
SHA-1 (`dev_ids`), chosen among the images the JSON lists (not those on disk), so unpacking
more images never moves an image between dev and train. Group id: `<folder>/<file_name>`.
Captions are numbered 0..n-1 in annotation order; some images have 6 or 7.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nlmm.data.corpora.base import (IMAGE_SUFFIXES, Caption, Corpus, CorpusSpec, Defect, Group,
                                    list_files)
from nlmm.errors import NlmmError

NAME = "coco"
LOOKS_FOR = "annotations/captions_train2017.json / captions_val2017.json (or 2014) and the images"
YEARS = ("2017", "2014")
PARTS = {"train": "train", "val": "test"}
JSON_DIRS = ("annotations", ".")
DEV_IMAGES = 1000


def _json_files(root: Path) -> dict[str, dict[str, Path]]:
    """year -> part -> caption file, for the years that have at least one."""
    found: dict[str, dict[str, Path]] = {}
    for year in YEARS:
        for part in PARTS:
            path = next((root / d / f"captions_{part}{year}.json" for d in JSON_DIRS
                         if (root / d / f"captions_{part}{year}.json").is_file()), None)
            if path is not None:
                found.setdefault(year, {})[part] = path
    return found


def detect(root: Path) -> bool:
    return root.is_dir() and bool(_json_files(root))


def dev_ids(train_ids: list[int]) -> set[int]:
    """The train image ids that form the dev split (see the module docstring)."""
    k = min(DEV_IMAGES, max(len(train_ids) // 20, 1 if len(train_ids) > 1 else 0))
    return set(sorted(train_ids, key=lambda i: hashlib.sha1(str(i).encode()).hexdigest())[:k])


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise NlmmError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); unzip "
                        f"annotations_trainval2017.zip again.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise NlmmError(f"{path} lacks COCO's 'images' and 'annotations' lists; unzip "
                        f"annotations_trainval2017.zip again.")
    return data


def _read_part(root: Path, folder: str, path: Path, data: dict, split_of: dict[int, str],
               defects: list[Defect]) -> tuple[list[Group], list[Caption]]:
    image_dir = next((d for d in (root / folder, root / "images" / folder) if d.is_dir()), None)
    if image_dir is None:
        defects.append(Defect("missing_image", f"{folder}/", f"{len(data['images'])} images of "
                              f"{path.name} belong in {root}/{folder}/, which does not exist; "
                              f"skipped"))
        return [], []
    on_disk = set(list_files(image_dir, IMAGE_SUFFIXES))
    gid_of: dict[int, str] = {}
    groups: list[Group] = []
    for img in data["images"]:
        name = str(img.get("file_name"))
        if name not in on_disk:
            defects.append(Defect("missing_image", name, f"listed in {path.name} but not in "
                                  f"{image_dir}/ (only part of {folder} unpacked?); skipped"))
            continue
        gid_of[img["id"]] = f"{folder}/{name}"
        groups.append(Group(f"{folder}/{name}", split_of[img["id"]], image=image_dir / name))
    listed = {img["id"] for img in data["images"]}
    captions: list[Caption] = []
    count: dict[str, int] = {}
    for ann in data["annotations"]:
        gid, text = gid_of.get(ann.get("image_id")), str(ann.get("caption") or "").strip()
        if ann.get("image_id") not in listed:
            defects.append(Defect("unknown_image", f"annotation {ann.get('id')}", f"names image "
                                  f"{ann.get('image_id')}, which {path.name} does not list; "
                                  f"skipped"))
        elif not text:
            defects.append(Defect("empty_caption", f"annotation {ann.get('id')}",
                                  "caption is empty; skipped"))
        elif gid is not None:
            captions.append(Caption(gid, count.get(gid, 0), text))
            count[gid] = count.get(gid, 0) + 1
    return groups, captions


def read(spec: CorpusSpec) -> Corpus:
    root = Path(spec.path)
    found = _json_files(root)
    if not found:
        raise NlmmError(f"no COCO caption file under {root}: unzip annotations_trainval2017.zip "
                        f"there so that {root}/annotations/captions_train2017.json exists.")
    # Mixing years would leak: 2017 train holds most of 2014 val.
    year = next(y for y in YEARS if y in found)
    files = found[year]
    notes = [f"COCO {year}: val{year} is the test split; dev is min({DEV_IMAGES}, 5%) of "
             f"train{year}'s images, chosen by a hash of their id"]
    if len(found) > 1:
        notes.append(f"{', '.join(p.name for p in found['2014'].values())} ignored: the 2017 "
                     f"files are read and the years must not be mixed")
    data = {part: _load(path) for part, path in files.items()}
    split_of: dict[int, str] = {}
    if "train" in data:
        train_ids = [img["id"] for img in data["train"]["images"]]
        dev = dev_ids(train_ids)
        split_of.update((i, "dev" if i in dev else "train") for i in train_ids)
    if "val" in data:
        split_of.update((img["id"], "test") for img in data["val"]["images"])
    groups: list[Group] = []
    captions: list[Caption] = []
    defects: list[Defect] = []
    for part, path in files.items():
        g, c = _read_part(root, f"{part}{year}", path, data[part], split_of, defects)
        groups += g
        captions += c
    notes += [f"no captions_{part}{year}.json: no {split} split" + (" and no dev split"
              if part == "train" else "") for part, split in PARTS.items() if part not in files]
    return Corpus(root, NAME, groups, captions, defects, sources=list(files.values()),
                  notes=notes)
