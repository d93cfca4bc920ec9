"""Karpathy's split files for Flickr8k, Flickr30k and COCO (`dataset_<name>.json`).

One JSON file lists every image with its split (train/val/test/restval) and its sentences;
the images sit beside it in the corpus's own folder. COCO entries carry a `filepath`
(train2014/val2014) naming the image's subfolder; Flickr entries carry none. Group id:
`<filepath>/<filename>`, or the file name. Captions are numbered 0..n-1 in sentence order.
"""

from __future__ import annotations

import json
from pathlib import Path

from nlmm.data.corpora.base import (IMAGE_SUFFIXES, Caption, Corpus, CorpusSpec, Defect, Group,
                                    list_files, split_name)
from nlmm.errors import NlmmError

NAME = "karpathy"
LOOKS_FOR = ("dataset_flickr8k.json / dataset_flickr30k.json / dataset_coco.json beside an "
             "image folder")
FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
JSON_DIRS = (".", "annotations", "data")
# Where each corpus's zip (or a user's rename) puts the images, most common first.
FLICKR_IMAGE_DIRS = ("images", "Images", "flickr30k-images", "flickr30k_images",
                     "Flickr8k_Dataset", "Flicker8k_Dataset", "Flickr8k_Dataset/Flicker8k_Dataset",
                     ".")


def _json_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.name in FILES else []
    return [root / d / f for d in JSON_DIRS for f in FILES if (root / d / f).is_file()]


def detect(root: Path) -> bool:
    return bool(_json_files(root))


def _corpus_root(json_file: Path) -> Path:
    parent = json_file.parent
    return parent.parent if parent.name in JSON_DIRS[1:] else parent


def _load(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise NlmmError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); download "
                        f"it again (it is in Karpathy's caption_datasets.zip).") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise NlmmError(f"{path} has no 'images' list, so it is not one of Karpathy's split "
                        f"files; download caption_datasets.zip again.")
    return data["images"]


def _image_dirs(root: Path, wanted: dict[str, set[str]]) -> dict[str, tuple[Path, set[str]]]:
    """Per `filepath` ("" for Flickr), the candidate folder holding most of its listed files,
    with the image files it holds; a filepath with no folder at all is left out."""
    chosen: dict[str, tuple[Path, set[str]]] = {}
    for filepath, names in wanted.items():
        candidates = ((root / filepath, root / "images" / filepath) if filepath
                      else tuple(root / d for d in FLICKR_IMAGE_DIRS))
        listed = [(d, set(list_files(d, IMAGE_SUFFIXES))) for d in candidates if d.is_dir()]
        if listed:
            chosen[filepath] = max(listed, key=lambda dl: len(dl[1] & names))
    if not any(wanted[fp] & on_disk for fp, (_, on_disk) in chosen.items()):
        where = (" and ".join(f"{root}/{fp}/" for fp in sorted(wanted)) if "" not in wanted
                 else f"{root}/images/ (or Images/, flickr30k-images/, Flicker8k_Dataset/)")
        raise NlmmError(f"none of the images the split file lists is under {root}: unpack the "
                        f"corpus's images into {where}.")
    return chosen


def _text(sentence: dict) -> str:
    raw = str(sentence.get("raw") or "").strip()
    return raw or " ".join(str(t) for t in sentence.get("tokens") or []).strip()


def read(spec: CorpusSpec) -> Corpus:
    files = _json_files(Path(spec.path))
    if not files:
        raise NlmmError(f"no Karpathy split file under {spec.path}: place {' or '.join(FILES)} "
                        f"in it (or in its annotations/ folder), beside the images.")
    if len(files) > 1:
        raise NlmmError(f"{spec.path} holds several Karpathy split files "
                        f"({', '.join(str(f) for f in files)}); pass one of them with --data.")
    path = files[0]
    root = _corpus_root(path)
    entries = _load(path)
    wanted: dict[str, set[str]] = {}
    for e in entries:
        wanted.setdefault(str(e.get("filepath") or ""), set()).add(str(e.get("filename")))
    dirs = _image_dirs(root, wanted)
    groups: list[Group] = []
    captions: list[Caption] = []
    # A whole subfolder missing (COCO's train2014/ not unpacked) is one defect, not 80k.
    defects = [Defect("missing_image", f"{fp}/", f"{len(names)} images listed in {path.name} "
                      f"are in {fp}/, which is not in {root}/ nor {root}/images/; skipped")
               for fp, names in wanted.items() if fp not in dirs]
    seen: set[str] = set()
    restval = 0
    for e in entries:
        filepath, filename = str(e.get("filepath") or ""), str(e.get("filename"))
        gid = f"{filepath}/{filename}" if filepath else filename
        if filepath not in dirs:
            continue
        folder, on_disk = dirs[filepath]
        if gid in seen:
            defects.append(Defect("duplicate", gid, f"listed twice in {path.name}; first kept"))
            continue
        if filename not in on_disk:
            defects.append(Defect("missing_image", gid, f"listed in {path.name} but not in "
                                  f"{folder}/; image and its sentences skipped"))
            continue
        seen.add(gid)
        split = split_name(str(e.get("split", "")))
        if split is None:
            defects.append(Defect("unknown_split", gid, f"split {e.get('split')!r} is none of "
                                  f"train/val/test/restval; image in no split"))
        restval += e.get("split") == "restval"
        groups.append(Group(gid, split, image=folder / filename))
        texts = []
        for sentence in e.get("sentences") or []:
            text = _text(sentence)
            if text:
                texts.append(text)
            else:
                defects.append(Defect("empty_caption", gid, f"sentence {sentence.get('sentid')} "
                                      f"has neither raw text nor tokens; skipped"))
        captions += [Caption(gid, i, t) for i, t in enumerate(texts)]
    notes = [f"split file: {path.name}; images in "
             + ", ".join(f"{d.relative_to(root)}/" for d, _ in dirs.values())]
    if restval:
        notes.append(f"restval: {restval} images trained on, as in every retrieval paper")
    return Corpus(root, NAME, groups, captions, defects, sources=[path], notes=notes)
