"""Tiny corpora written in each public on-disk layout, with their known defects.

Every builder takes (root, n: groups per split, seed), writes real file names, folder trees
and annotation files (JSON / CSV / TSV / trans.txt) beside synthetic media (48x48 PIL shapes,
0.3 s soundfile tones), and returns a `Written` saying what a reader must return: the groups
and their splits, each group's captions in order, the modalities and the defects. Tests
compare readers against it, so the expectations never come from the readers themselves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
from corpus_factory import tone
from PIL import Image, ImageDraw

SIZES = (6, 3, 3)
SAMPLE_RATE = 16000
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
# libsndfile writes MP3 from 1.1 on; the Common Voice layout needs it.
MP3 = "MP3" in sf.available_formats()


@dataclass
class Written:
    """What a builder wrote: what `read(CorpusSpec(path))` must return."""

    path: Path                       # what --data points at
    format: str
    groups: dict[str, str] = field(default_factory=dict)           # group id -> split
    captions: dict[str, list[str]] = field(default_factory=dict)   # group id -> texts in order
    image: bool = False              # every group has an image
    audio: bool = False              # every group has a clip
    defects: list[tuple[str, str]] = field(default_factory=list)   # (kind, item)

    def add(self, gid: str, split: str, texts: list[str]) -> None:
        self.groups[gid] = split
        self.captions[gid] = texts

    def count(self, split: str) -> int:
        return sum(s == split for s in self.groups.values())


def picture(path: Path, i: int) -> tuple[str, str]:
    """A coloured shape on a coloured background, saved as the suffix says (JPEG or PNG)."""
    fg, bg, shape = COLOURS[i % 6], COLOURS[(i + 2) % 6], SHAPES[i % 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (48, 48), bg)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((10, 10, 38, 38), fill=fg)
    elif shape == "square":
        draw.rectangle((10, 10, 38, 38), fill=fg)
    else:
        draw.polygon([(24, 8), (40, 40), (8, 40)], fill=fg)
    img.save(path)
    return fg, shape


def sound(path: Path, i: int) -> None:
    """A 0.3 s tone at 16 kHz, in the format the suffix names (WAV, FLAC or MP3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tone(300.0 + 40.0 * i, 0.3, SAMPLE_RATE)
    fmt = path.suffix[1:].upper()
    sf.write(path, data, SAMPLE_RATE, format=fmt, subtype=None if fmt == "MP3" else "PCM_16")


def describe(i: int, k: int) -> list[str]:
    fg, bg, shape = COLOURS[i % 6], COLOURS[(i + 2) % 6], SHAPES[i % 3]
    return [f"A {fg} {shape} on a {bg} background.", f"The {shape} is {fg}, the rest {bg}.",
            f"A picture of a {fg} {shape}.", f"Something {fg} sits in front of {bg}.",
            f"One {shape}, drawn in {fg}.", f"Look: a {shape}!", f"{fg} and {bg}, mostly."][:k]


def splits_of(n: tuple[int, int, int]) -> list[str]:
    return ["train"] * n[0] + ["dev"] * n[1] + ["test"] * n[2]


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------- images

def write_karpathy(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0,
                   coco: bool = False) -> Written:
    """Flickr30k's `dataset_flickr30k.json` beside flickr30k-images/ (one PNG), or COCO's
    `data/dataset_coco.json` with train2014/ and val2014/ under images/ (restval included).
    Defects: a listed image that is not on disk, a sentence with neither raw text nor tokens;
    a sentence with tokens but no raw text is joined from its tokens."""
    rng = random.Random(seed)
    out = Written(root, "karpathy", image=True)
    raw_splits = {"train": "train", "dev": "val", "test": "test"}
    images, sentid = [], 0
    for i, split in enumerate(splits_of(n) + ["train"]):
        missing = i == sum(n)
        raw = "restval" if coco and split == "train" and i % 2 else raw_splits[split]
        if coco:
            fp = "train2014" if raw == "train" else "val2014"
            filename = f"COCO_{fp}_{rng.randrange(10**12):012d}.jpg"
            gid, where = f"{fp}/{filename}", root / "images" / fp / filename
        else:
            fp, filename = None, f"{rng.randrange(10**9, 10**10)}{'.png' if i == 1 else '.jpg'}"
            gid, where = filename, root / "flickr30k-images" / filename
        texts = describe(i, 5)
        sentences = [{"raw": t, "tokens": t.lower().rstrip(".").split(), "imgid": i,
                      "sentid": sentid + k} for k, t in enumerate(texts)]
        sentid += 5
        if i == 0:
            sentences[1]["raw"] = ""          # joined from its tokens
            texts[1] = " ".join(sentences[1]["tokens"])
            sentences[4] = {"raw": "  ", "tokens": [], "imgid": i, "sentid": sentences[4]["sentid"]}
            texts.pop(4)
            out.defects.append(("empty_caption", gid))
        entry = {"filename": filename, "imgid": i, "split": raw, "sentences": sentences,
                 "sentids": [s["sentid"] for s in sentences]}
        if coco:
            entry.update(filepath=fp, cocoid=rng.randrange(10**6))
        images.append(entry)
        if missing:
            out.defects.append(("missing_image", gid))
        else:
            picture(where, i)
            out.add(gid, split, texts)
    json_dir = root / "data" if coco else root
    json_dir.mkdir(parents=True, exist_ok=True)
    name = "dataset_coco.json" if coco else "dataset_flickr30k.json"
    (json_dir / name).write_text(json.dumps({"images": images,
                                             "dataset": "coco" if coco else "flickr30k"}))
    return out


def coco_dev_ids(ids: list[int]) -> set[int]:
    """COCO's documented dev carve: the min(1000, 5%) train ids with the lowest SHA-1."""
    k = min(1000, max(len(ids) // 20, 1 if len(ids) > 1 else 0))
    return set(sorted(ids, key=lambda i: hashlib.sha1(str(i).encode()).hexdigest())[:k])


def write_coco(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0,
               year: str = "2017") -> Written:
    """annotations/captions_{train,val}<year>.json, train<year>/ and val<year>/. The train JSON
    lists 20 x n[1] images so the carved dev split holds n[1]; two train images and one val
    image are listed but not unpacked; one image has 7 captions and one 6; annotations are
    shuffled, so caption order is annotation order, not image order."""
    rng = random.Random(seed)
    out = Written(root, "coco", image=True)
    ann_id = 0
    for part, count in (("train", 20 * n[1]), ("val", n[2] + 1)):
        ids = rng.sample(range(1, 600000), count)
        dev = coco_dev_ids(ids) if part == "train" else set()
        missing = ([i for i in ids if i not in dev][:2] if part == "train" else ids[:1])
        images, anns = [], []
        for j, image_id in enumerate(ids):
            name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": 48, "height": 48})
            texts = describe(j, 7 if j == 3 else 6 if j == 4 else 5)
            anns += [(image_id, t) for t in texts]
            if image_id in missing:
                out.defects.append(("missing_image", name))
                continue
            picture(root / f"{part}{year}" / name, j)
            split = "test" if part == "val" else "dev" if image_id in dev else "train"
            out.add(f"{part}{year}/{name}", split, texts)
        rng.shuffle(anns)
        for gid in (g for g in out.captions if g.startswith(part)):
            image_id = int(gid.split("/")[1][:-4])
            out.captions[gid] = [t for i, t in anns if i == image_id]
        annotations = []
        for image_id, text in anns:
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": image_id, "caption": text + " \n"})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{part}{year}.json").write_text(
            json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return out


# --------------------------------------------------------------------------- audio

def youtube_id(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(rng.choice(alphabet) for _ in range(11))


def write_audiocaps(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """dataset/{train,val,test}.csv and clips under audio/<split>/, named as three download
    scripts name them: train by audiocap_id, val AudioSet-style (Y<id>_30.000_40.000), test by
    youtube id (FLAC). Two train clips and one val clip were never downloaded."""
    rng = random.Random(seed)
    out = Written(root, "audiocaps", audio=True)
    cap_id = 100000
    for split_name, split, count, per_clip in (("train", "train", n[0] + 2, 1),
                                                ("val", "dev", n[1] + 1, 5),
                                                ("test", "test", n[2], 5)):
        rows = []
        for j in range(count):
            yid, start = youtube_id(rng), rng.randrange(0, 300, 10)
            texts = describe(j, per_clip)
            ids = list(range(cap_id, cap_id + per_clip))
            cap_id += per_clip
            rows += [[i, yid, start, t] for i, t in zip(ids, texts, strict=True)]
            gid = f"{yid}_{start}"
            if j >= count - (2 if split_name == "train" else 1 if split_name == "val" else 0):
                out.defects.append(("missing_audio", gid))
                continue
            name = {"train": f"{ids[0]}.wav", "val": f"Y{yid}_{start:.3f}_{start + 10:.3f}.wav",
                    "test": f"{yid}.flac"}[split_name]
            sound(root / "audio" / split_name / name, j)
            out.add(gid, split, texts)
        rng.shuffle(rows)   # the CSVs interleave a clip's captions with other clips'
        for gid in [g for g, s in out.groups.items() if s == split]:
            out.captions[gid] = [r[3] for r in rows if f"{r[1]}_{r[2]}" == gid]
        write_csv(root / "dataset" / f"{split_name}.csv",
                  ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    return out


def write_clotho(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """clotho_captions_<split>.csv (quoted captions with commas) and WAVs in development/,
    validation/ and clotho_audio_evaluation/; file names with spaces and commas. Defects: an
    empty caption cell, a listed clip that is not on disk."""
    out = Written(root, "clotho", audio=True)
    folders = {"development": "development", "validation": "validation",
               "evaluation": "clotho_audio_evaluation"}
    i = 0
    for (raw, folder), split, count in zip(folders.items(), ("train", "dev", "test"), n,
                                          strict=True):
        rows = []
        for j in range(count + (1 if raw == "development" else 0)):
            i += 1
            name = f"Rain on roof, take {seed}-{i}.wav" if j % 2 else f"{i:05d}_street noise.wav"
            texts = [f"{t} Then, quiet." for t in describe(i, 5)]
            gid = f"{raw}/{name}"
            cells = list(texts)
            if i == 2:
                cells[2] = ""
                texts.pop(2)
                out.defects.append(("empty_caption", f"{gid} caption_3"))
            rows.append([name, *cells])
            if raw == "development" and j == count:
                out.defects.append(("missing_audio", gid))
                continue
            sound(root / folder / name, i)
            out.add(gid, split, texts)
        write_csv(root / f"clotho_captions_{raw}.csv",
                  ["file_name"] + [f"caption_{k}" for k in range(1, 6)], rows)
    return out


def write_librispeech(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """LibriSpeech/{train-clean-100,dev-clean,test-other}/<spk>/<chap>/ with trans.txt and
    FLACs. Defects: a malformed transcript line, an utterance whose FLAC is missing."""
    rng = random.Random(seed)
    out = Written(root, "librispeech", audio=True)
    i = 0
    for folder, split, count in zip(("train-clean-100", "dev-clean", "test-other"),
                                    ("train", "dev", "test"), n, strict=True):
        for c in range(2):
            spk, chap = rng.randrange(10, 9000), rng.randrange(1000, 200000)
            chapter = root / "LibriSpeech" / folder / str(spk) / str(chap)
            chapter.mkdir(parents=True, exist_ok=True)
            lines = []
            for u in range(count // 2 + (c < count % 2)):
                i += 1
                utt = f"{spk}-{chap}-{u:04d}"
                text = describe(i, 1)[0].upper().replace(".", "").replace(",", "")
                lines.append(f"{utt} {text}")
                sound(chapter / f"{utt}.flac", i)
                out.add(utt, split, [text.lower()])
            if folder == "train-clean-100" and c == 0:
                lines.append(f"{spk}-{chap}-0099 A LINE WHOSE FLAC IS GONE")
                out.defects.append(("missing_audio", f"{spk}-{chap}-0099.flac"))
                lines.append("NOT-AN-UTTERANCE-ID")
                out.defects.append(("malformed_line", f"{spk}-{chap}.trans.txt:{len(lines)}"))
            (chapter / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return out


def write_commonvoice(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """cv-corpus-17.0-2024-03-15/en/ with the release's TSV columns, clips/*.mp3, and the
    validated/invalidated/other TSVs that the reader must ignore; --data is the release folder.
    Sentences hold unbalanced quotes. Defects: two rows with empty sentences, a missing clip."""
    rng = random.Random(seed)
    lang = root / "cv-corpus-17.0-2024-03-15" / "en"
    out = Written(lang.parent, "commonvoice", audio=True)
    header = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
              "down_votes", "age", "gender", "accents", "variant", "locale", "segment"]
    all_rows, i = [], 0
    for split, count in zip(("train", "dev", "test"), n, strict=True):
        lines = ["\t".join(header)]
        for j in range(count + (3 if split == "train" else 0)):
            i += 1
            clip = f"common_voice_en_{rng.randrange(10**7, 10**8)}.mp3"
            text = f'"{describe(i, 1)[0]} he said' if j % 2 else describe(i, 1)[0]
            if split == "train" and j >= count:
                text = "" if j < count + 2 else text
                out.defects.append(("empty_caption" if not text else "missing_audio", clip))
            else:
                sound(lang / "clips" / clip, i)
                out.add(clip, split, [text])
            row = [f"{rng.getrandbits(64):016x}", clip, f"{i:064x}", text, "", "2", "0",
                   "twenties", "", "", "", "en", ""]
            lines.append("\t".join(row))
            all_rows.append("\t".join(row))
        (lang / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in ("validated.tsv", "invalidated.tsv", "other.tsv"):
        (lang / name).write_text("\n".join(["\t".join(header), *all_rows]) + "\n")
    return out


# --------------------------------------------------------------------------- manifests

def manifest_split(group_id: str) -> str:
    """The manifest's documented split of a group without a split column: SHA-1, 90/5/5."""
    h = int(hashlib.sha1(group_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 90 else "dev" if h < 95 else "test"


def write_openclip_csv(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """open_clip's layout with a comma separator (its KeyError case: open_clip expects a tab):
    filepath,title, one row per image, captions quoted because they hold commas, no split
    column; images (one PNG) in images/. --data is the CSV file."""
    out = Written(root / "train_data.csv", "manifest", image=True)
    rows = []
    for i in range(sum(n)):
        rel = f"images/{seed}_{i:04d}.{'png' if i == 2 else 'jpg'}"
        picture(root / rel, i)
        text = describe(i, 2)[1]
        rows.append([rel, text])
        out.add(rel, manifest_split(rel), [text])
    write_csv(out.path, ["filepath", "title"], rows)
    return out


def write_manifest_tsv(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """manifest.tsv in the corpus folder: image, caption, split (train/val/test), one row per
    caption (3 per image). Defects: an image listed but missing, an http URL, a text file in
    the image column, a split value that is none of train/dev/test."""
    out = Written(root, "manifest", image=True)
    rows = []
    for i, split in enumerate(splits_of(n)):
        rel = f"pics/{split}/{i:03d}.jpg"
        picture(root / rel, i)
        texts = describe(i, 3)
        rows += [[rel, t, {"dev": "val"}.get(split, split)] for t in texts]
        out.add(rel, split, texts)
    rows.append(["pics/train/gone.jpg", "A picture that was never copied.", "train"])
    out.defects.append(("missing_image", "pics/train/gone.jpg"))
    rows.append(["https://example.com/a.jpg", "A picture on the web.", "train"])
    out.defects.append(("remote_file", "https://example.com/a.jpg"))
    rows.append(["pics/train/notes.txt", "Not a picture at all.", "train"])
    out.defects.append(("unsupported_file", "pics/train/notes.txt"))
    rows.append([rows[0][0], "A caption of an unknown split.", "holdout"])
    out.defects.append(("unknown_split", f"manifest.tsv:{len(rows) + 1}"))
    write_csv(root / "manifest.tsv", ["image", "caption", "split"], rows, delimiter="\t")
    return out


def write_manifest_jsonl(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """metadata.jsonl for sounds (no image): {"audio": ..., "captions": [...], "split": ...};
    the clip is the group's. Defects: a line that is not JSON."""
    out = Written(root, "manifest", audio=True)
    lines = []
    for i, split in enumerate(splits_of(n)):
        rel = f"clips/{i:03d}.wav"
        sound(root / rel, i)
        texts = describe(i, 2)
        lines.append(json.dumps({"audio": rel, "captions": texts, "split": split}))
        out.add(rel, split, texts)
    lines.insert(2, '{"audio": "clips/x.wav", "captions": ["cut off')
    out.defects.append(("malformed_line", "metadata.jsonl:3"))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def write_manifest_parquet(root: Path, n: tuple[int, int, int] = SIZES, seed: int = 0) -> Written:
    """pairs.parquet: img (relative), texts (a list per image: a column name nothing guesses,
    so tests pass --columns text=texts), subset; --data is the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Written(root / "pairs.parquet", "manifest", image=True)
    cols: dict[str, list] = {"img": [], "texts": [], "subset": []}
    for i, split in enumerate(splits_of(n)):
        rel = f"{i:03d}.jpg"
        picture(root / rel, i)
        texts = describe(i, 2)
        for col, value in zip(cols, (rel, texts, split), strict=True):
            cols[col].append(value)
        out.add(rel, split, texts)
    pq.write_table(pa.table(cols), out.path)
    return out


BUILDERS = {"karpathy-flickr30k": write_karpathy,
            "karpathy-coco": lambda root, n=SIZES, seed=0: write_karpathy(root, n, seed, coco=True),
            "coco": write_coco, "audiocaps": write_audiocaps, "clotho": write_clotho,
            "librispeech": write_librispeech, "commonvoice": write_commonvoice,
            "manifest-openclip-csv": write_openclip_csv, "manifest-tsv": write_manifest_tsv,
            "manifest-jsonl": write_manifest_jsonl, "manifest-parquet": write_manifest_parquet}
