"""One block of a pack, in a pool worker: every file decoded (the checks `nlmm data check`
makes), the kept groups' features made as the prepared cache makes them (the image cropped to
data.image_size and encoded, the float16 log-mel of every recording), laid out as litdata
samples and written as the block's shard. The shard depends on the block alone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nlmm.config import DataConfig
from nlmm.data.corpora.base import Defect
from nlmm.data.features import BadInput, load_image, load_wav, log_mel
from nlmm.data.pack_index import INDEX, sha256_file
from nlmm.data.pack_plan import Block, Item


FEATURE_KEYS = ("image_size", "sample_rate", "n_mels", "win_length", "hop_length",
                "max_audio_seconds")
JPEG_QUALITY = 95  # a second lossy pass at this quality moves pixels by a grey level or two


def feature_params(cfg: DataConfig) -> dict[str, Any]:
    """The data settings a pack's stored images and log-mels are made with."""
    return {k: getattr(cfg, k) for k in FEATURE_KEYS}


def bake_image(path: str, size: int) -> tuple[bytes, str]:
    """The image as the model reads it, (size, size) after features.load_image, encoded: the
    original bytes when the file already is a JPEG or PNG of exactly that size, else JPEG for a
    JPEG source (a photo re-encoded as PNG would be several times larger) and PNG for any other
    (lossless stays lossless). Decoding at training time is then a small image's decode."""
    pixels = load_image(Path(path), size)  # raises BadInput with the reason
    Image = _pil()
    with Image.open(path) as img:
        fmt, dims = img.format, img.size
    if fmt in ("JPEG", "PNG") and dims == (size, size):
        return Path(path).read_bytes(), fmt.lower()
    out = io.BytesIO()
    rgb = Image.fromarray(pixels.transpose(1, 2, 0))
    if fmt == "JPEG":
        rgb.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        return out.getvalue(), "jpeg"
    rgb.save(out, format="PNG")
    return out.getvalue(), "png"


def _pil() -> Any:
    from PIL import Image

    return Image


def bake_audio(path: str, cfg: DataConfig) -> tuple[np.ndarray, int]:
    """float16 log-mel (n_mels, T) exactly as the prepared cache stores it, and the length of
    the whole recording in samples at cfg.sample_rate (before the max_audio_seconds cut)."""
    wave = load_wav(Path(path), cfg.sample_rate)  # raises BadInput with the reason
    return log_mel(wave, cfg), len(wave)


def no_audio(cfg: DataConfig) -> np.ndarray:
    return np.zeros((cfg.n_mels, 0), dtype=np.float16)



@dataclass
class Verdict:
    """What survives of one group after decoding."""

    keep: bool
    image: bool
    clip: bool
    readings: list[bool]
    audio: list[bool]  # per caption: its own reading, else the clip, decodes


def judge(item: Item, result: list) -> tuple[Verdict, list[Defect]]:
    """The cache's rules (nlmm.data.cache): a group whose image fails is dropped with its
    captions unless it is a clip's group; a failed reading leaves its caption without audio.
    `result` is [image, clip, [readings]], each None (decodes), '' (absent) or the reason."""
    image_r, clip_r, reading_r = result
    image_ok, clip_ok = image_r is None, clip_r is None
    readings = [r is None for r in reading_r]
    audio = [own if path is not None else clip_ok
             for own, path in zip(readings, item.readings, strict=True)]
    keep = image_ok or (any(audio) and (item.image is None or item.clip is not None))
    defects = []
    if image_r:
        what = ("image skipped; the clip and captions kept" if item.clip is not None
                else "image and its captions skipped")
        defects.append(Defect("bad_image", Path(item.image).name, f"{image_r}; {what}"))
    if clip_r:
        defects.append(Defect("bad_audio", Path(item.clip).name, f"{clip_r}; clip skipped"))
    for path, reason in zip(item.readings, reading_r, strict=True):
        if reason:
            defects.append(Defect("bad_audio", Path(path).name,
                                  f"{reason}; caption kept without audio"))
    return Verdict(keep, image_ok, clip_ok, readings, audio), defects


class _Decoded:
    """A block's files decoded once: each file's features or the reason it failed (a clip
    shared by several groups is decoded once)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.images: dict[str, tuple[bytes, str] | str] = {}
        self.audio: dict[str, tuple[np.ndarray, int] | str] = {}

    def image(self, path: str | None) -> str | None:
        """None when the image decodes, '' when there is none, else the reason."""
        if path is None:
            return ""
        if path not in self.images:
            try:
                self.images[path] = bake_image(path, self.cfg.image_size)
            except BadInput as exc:
                self.images[path] = str(exc)
        return self.images[path] if isinstance(self.images[path], str) else None

    def sound(self, path: str | None) -> str | None:
        if path is None:
            return ""
        if path not in self.audio:
            try:
                self.audio[path] = bake_audio(path, self.cfg)
            except BadInput as exc:
                self.audio[path] = str(exc)
        return self.audio[path] if isinstance(self.audio[path], str) else None

    def mel(self, path: str | None, ok: bool) -> np.ndarray:
        return self.audio[path][0] if ok and path is not None else no_audio(self.cfg)

    def longest(self) -> int:
        return max((v[1] for v in self.audio.values() if not isinstance(v, str)), default=0)


def make_sample(item: Item, verdict: Verdict, decoded: _Decoded, group: int,
                caption: int) -> dict[str, Any]:
    """The stored form of a group. litdata keeps one fixed tree shape for every sample, so the
    variable-length parts are flattened: caption texts as a JSON list, the captions' own
    log-mels concatenated along time and cut by `reading_frames` (see caption_readings).
    `group` and `caption` count within the shard; the reader adds the shard's offsets from
    nlmm_pack.json, so a shard's bytes depend on its block alone."""
    image, image_format = (decoded.images[item.image] if verdict.image else (b"", ""))
    readings = [decoded.mel(p, ok) for p, ok in zip(item.readings, verdict.readings, strict=True)]
    modalities = [m for m, on in (("image", verdict.image), ("text", True),
                                  ("audio", any(verdict.audio))) if on]
    return {
        "group_id": item.gid,
        "group": group,
        "caption_base": caption,
        "split": item.split,
        "image": image,
        "image_format": image_format,
        "clip": decoded.mel(item.clip, verdict.clip),
        "captions": json.dumps(item.captions, ensure_ascii=False),
        "readings": np.concatenate(readings, axis=1) if readings else no_audio(decoded.cfg),
        "reading_frames": np.array([r.shape[1] for r in readings], dtype=np.int64),
        "modalities": ",".join(modalities),
    }


def caption_readings(sample: dict[str, Any]) -> list[np.ndarray]:
    """The captions' own log-mels of a stored sample, (n_mels, 0) where a caption has none."""
    mels, out, pos = sample["readings"], [], 0
    for frames in np.asarray(sample["reading_frames"]).tolist():
        out.append(mels[:, pos:pos + frames])
        pos += frames
    return out


def pack_block(job: tuple[Block, dict[str, Any], str]) -> dict[str, Any]:
    """Decode every file of a block (the checks `nlmm data check` makes), bake the kept groups'
    features and write the block's shard into the staging folder. Runs in a pool worker; the
    result is the block's marker: per item the decode results, and the shard's chunk info,
    config and sha256. The shard depends on the block only, so a rewrite is identical."""
    from litdata.streaming.writer import BinaryWriter

    block, params, staging = job
    decoded = _Decoded(DataConfig(**params))
    results = [[decoded.image(it.image), decoded.sound(it.clip),
                [decoded.sound(p) for p in it.readings]] for it in block.items]
    samples, captions = [], 0
    for item, result in zip(block.items, results, strict=True):
        verdict, _ = judge(item, result)
        if verdict.keep:
            samples.append(make_sample(item, verdict, decoded, len(samples), captions))
            captions += len(item.captions)
    marker = {"block": block.name, "results": results, "chunk": None, "samples": len(samples),
              "captions": captions, "longest_audio": decoded.longest()}
    if not samples:
        return marker
    tmp = Path(tempfile.mkdtemp(prefix=f"{block.name}.", dir=staging))
    try:
        writer = BinaryWriter(str(tmp), chunk_size=len(samples))
        for i, sample in enumerate(samples):
            writer.add_item(i, sample)
        writer.done()
        index = json.loads((tmp / f"{writer.rank}.{INDEX}").read_text())
        if len(index["chunks"]) != 1:
            raise RuntimeError(f"block {block.name} became {len(index['chunks'])} chunks, not 1")
        chunk = index["chunks"][0]
        final = Path(staging) / f"{block.name}.bin"
        os.replace(tmp / chunk["filename"], final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    chunk["filename"] = Path(block.shard).name
    return {**marker, "chunk": chunk, "config": index["config"], "path": str(final),
            "sha256": sha256_file(final), "bytes": final.stat().st_size}
