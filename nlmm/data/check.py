"""`nlmm data check`: counts per split and modality, and every defect with its reason.

Works on any corpus format (nlmm.data.corpora). With `decode`, every image, clip and spoken
caption of a split is decoded in parallel, so corrupt and truncated files are found before a
prepare or a training run meets them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group as RichGroup
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from nlmm.data.corpora import read_corpus
from nlmm.data.corpora.base import SPLITS, Caption, Corpus, CorpusSpec, Defect, Group
from nlmm.data.features import BadInput, load_image, read_audio
from nlmm.data.parallel import map_chunks

# images / clips: groups whose image / clip decodes; captions: caption lines of the split;
# wavs: captions with usable audio (their own reading or their group's clip); pairs: captions
# whose image decodes; triples: both.
COUNT_KEYS = ("images", "clips", "captions", "wavs", "pairs", "triples")
COUNT_HEADERS = {"images": "images", "clips": "clips", "captions": "captions",
                 "wavs": "with audio", "pairs": "image-text", "triples": "image-text-audio"}
# Decoding images at a small size still reads every byte of the file, which is what finds
# corrupt and truncated ones, at a fraction of the cost of a full-size decode.
CHECK_IMAGE_SIZE = 32
MODALITY_OF_PAIR = {"pairs": ("image", "text"), "wavs": ("text", "audio")}


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


def check_audio_chunk(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(path, reason or None) per audio file: read and validate every sample."""
    out: list[tuple[Path, str | None]] = []
    for path in paths:
        try:
            read_audio(path)
            out.append((path, None))
        except BadInput as exc:
            out.append((path, str(exc)))
    return out


def caption_audio(caption: Caption, group: Group | None) -> Path | None:
    """The audio a caption pairs with: its own reading, else its group's clip."""
    if caption.audio is not None:
        return caption.audio
    return group.audio if group is not None else None


@dataclass
class CheckReport:
    root: Path
    counts: dict[str, dict[str, int]]
    defects: list[Defect]
    unassigned_images: int
    decoded: bool
    format: str = "flickr8k"
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Training needs at least one pair of modalities (image-text or text-audio) in train."""
        train = self.counts.get("train", {})
        return train.get("pairs", 0) > 0 or train.get("wavs", 0) > 0

    def modalities(self) -> tuple[str, ...]:
        """The modalities the usable part of the corpus has, in MODALITIES order."""
        total = self.counts.get("total", {})
        present = set()
        if total.get("pairs", 0):
            present |= {"image", "text"}
        if total.get("wavs", 0):
            present |= {"text", "audio"}
        return tuple(m for m in ("image", "text", "audio") if m in present)

    def shown_counts(self) -> tuple[str, ...]:
        """COUNT_KEYS less the columns of modalities the corpus lacks (an image-text corpus
        shows no audio columns; a corpus of clips no image ones), so no zero reads as a count."""
        total = self.counts.get("total", {})
        hidden = set()
        if not total.get("images", 0) and not total.get("pairs", 0):
            hidden |= {"images", "pairs", "triples"}
        if not total.get("wavs", 0):
            hidden |= {"wavs", "triples"}
        if not total.get("clips", 0):
            hidden.add("clips")
        return tuple(k for k in COUNT_KEYS if k not in hidden) if total else COUNT_KEYS

    def defect_kinds(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.defects))

    def to_table(self, max_defects: int | None = None) -> RichGroup:
        """Counts per split, then every defect (or the first `max_defects`) with its reason."""
        title = f"corpus {self.root} ({self.format}: {', '.join(self.modalities()) or 'nothing'})"
        counts = Table(title=title + ("" if self.decoded else " (not decoded)"))
        counts.add_column("split")
        keys = self.shown_counts()
        for key in keys:
            counts.add_column(COUNT_HEADERS[key], justify="right")
        for split, row in self.counts.items():
            counts.add_row(split, *(str(row.get(k, 0)) for k in keys),
                           style="bold" if split == "total" else None)
        parts: list[Table | Text] = [counts]
        parts.extend(Text(note) for note in self.notes)
        for split in SPLITS:
            if split in self.counts and not any(self.counts[split].values()):
                parts.append(Text(f"the {split} split has no rows.", style="yellow"))
        if self.unassigned_images:
            parts.append(Text(f"{self.unassigned_images} image(s) or clip(s) belong to no split "
                              f"and are skipped."))
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
            parts.append(Text("nothing usable: the train split has no image-caption or "
                              "caption-audio pair.", style="bold red"))
        return RichGroup(*parts)


def tally(groups: list[Group], captions: list[Caption], has_audio: dict[tuple[str, int], bool],
          image_ok: set[str], clip_ok: set[str] | None = None) -> dict[str, dict[str, int]]:
    """Per-split counts (COUNT_KEYS), plus 'total'. `has_audio[(group, index)]`: the caption's
    audio (own or clip) decodes; `image_ok` / `clip_ok`: groups whose image / clip decodes."""
    clip_ok = clip_ok or set()
    split_of = {g.id: g.split for g in groups}
    counts = {s: dict.fromkeys(COUNT_KEYS, 0) for s in SPLITS}
    for g in groups:
        if g.split is not None:
            counts[g.split]["images"] += g.id in image_ok
            counts[g.split]["clips"] += g.id in clip_ok
    for cap in captions:
        split = split_of.get(cap.group)
        if split is None:
            continue
        audio = has_audio.get((cap.group, cap.index), False)
        good_image = cap.group in image_ok
        counts[split]["wavs"] += audio
        counts[split]["captions"] += 1
        counts[split]["pairs"] += good_image
        counts[split]["triples"] += good_image and audio
    counts["total"] = {k: sum(counts[s][k] for s in SPLITS) for k in COUNT_KEYS}
    return counts


def _decode_all(paths: list[Path], fn, label: str, bar: Progress,
                workers: int | None) -> dict[Path, str]:
    """Reason per path that fails to decode."""
    bad: dict[Path, str] = {}
    task = bar.add_task(label, total=len(paths))
    for chunk in map_chunks(fn, paths, workers=workers, progress=bar, task=task):
        for path, reason in chunk:
            if reason is not None:
                bad[path] = reason
    return bad


def check_corpus(spec: CorpusSpec | Path, decode: bool = True, workers: int | None = None,
                 progress: bool = False) -> CheckReport:
    """Counts per split and every defect; with `decode`, every image and audio file is decoded."""
    corpus: Corpus = read_corpus(spec)
    defects = list(corpus.defects)
    in_split = [g for g in corpus.groups if g.split is not None]
    by_id = {g.id: g for g in in_split}
    image_ok = {g.id for g in in_split if g.image is not None}
    clip_ok = {g.id for g in in_split if g.audio is not None}
    audio_caps = [c for c in corpus.captions if c.group in by_id
                  and caption_audio(c, by_id[c.group]) is not None]
    bad_audio: dict[Path, str] = {}
    if decode:
        with Progress(disable=not progress, transient=True) as bar:
            images = [g.image for g in in_split if g.image is not None]
            bad_images = _decode_all(images, check_images_chunk, "decoding images", bar, workers)
            audio = sorted({caption_audio(c, by_id[c.group]) for c in audio_caps}
                           | {g.audio for g in in_split if g.audio is not None})
            bad_audio = _decode_all(audio, check_audio_chunk, "decoding audio", bar, workers)
        for g in in_split:
            if g.image in bad_images:
                image_ok.discard(g.id)
                what = ("image skipped; its captions kept with the clip" if g.audio is not None
                        else "image and its captions skipped")
                defects.append(Defect("bad_image", g.image.name, f"{bad_images[g.image]}; {what}"))
            if g.audio in bad_audio:
                clip_ok.discard(g.id)
                defects.append(Defect("bad_audio", g.audio.name, bad_audio[g.audio]
                                      + "; clip skipped"))
        for c in corpus.captions:
            if c.audio is not None and c.audio in bad_audio and c.group in by_id:
                defects.append(Defect("bad_audio", c.audio.name, bad_audio[c.audio]
                                      + "; caption kept without audio"))
    has_audio = {(c.group, c.index): caption_audio(c, by_id[c.group]) not in bad_audio
                 for c in audio_caps}
    counts = tally(corpus.groups, corpus.captions, has_audio, image_ok, clip_ok)
    return CheckReport(Path(corpus.root), counts, defects, len(corpus.unassigned_groups()),
                       decode, corpus.format, list(corpus.notes))
