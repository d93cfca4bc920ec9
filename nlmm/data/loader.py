"""Batches from a prepared cache: numpy gathers from memmaps, prefetched on a thread.

Training batches are (image, caption n, spoken caption n) triples, one per caption row of a
split, in an order fixed by (seed, epoch) so a resumed run sees exactly the batches it missed.
Image augmentation runs on the whole batch tensor on the target device.

When the cache carries backbone feature sets (`PreparedCache.features`, see
nlmm.data.backbone_features), `image` is served as the cached features (B, tokens, C) instead
of pixels (no augmentation: the features are fixed), and `audio` as features (B, T, C) or 16 kHz
waveforms (B, samples) with their mask instead of log-mels. Both travel as fp16 / int16 and
become float32 on the target device.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nlmm.config import MODALITIES
from nlmm.data.cache import PreparedCache
from nlmm.data.features import PCM_SCALE, normalize_images
from nlmm.errors import NlmmError

PREFETCH_DEPTH = 2
CROP_AREA = (0.7, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


# --------------------------------------------------------------------------- gathering

def gather_text(cache: PreparedCache, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids int64 (B, L) trimmed to the longest caption of the batch, and the real-token mask."""
    lengths = cache.token_lengths[rows]
    width = max(1, int(lengths.max(initial=0)))
    ids = torch.from_numpy(cache.tokens[rows, :width].astype(np.int64))
    mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
    return ids, mask


def gather_audio(cache: PreparedCache, rows: np.ndarray,
                 max_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-mel float32 (B, 1, n_mels, T), frame mask (B, T) and has_audio (B,).

    Captions without audio get an all-False mask (and has_audio False): their rows are padding
    that every consumer must ignore, not a stand-in for speech.
    """
    lengths = cache.mel_lengths[rows].astype(np.int64)
    if max_frames is not None:
        lengths = np.minimum(lengths, max_frames)
    width = max(1, int(lengths.max(initial=0)))
    out = np.zeros((len(rows), cache.data_cfg.n_mels, width), dtype=np.float32)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if n:
            off = int(cache.mel_offsets[row])
            out[i, :, :n] = cache.mels[off:off + n].T
    mask = np.arange(width)[None, :] < lengths[:, None]
    return (torch.from_numpy(out).unsqueeze(1), torch.from_numpy(mask),
            torch.from_numpy(cache.mel_lengths[rows] > 0))


def gather_images(cache: PreparedCache, image_rows: np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, S, S) copied out of the memmap, or fp16 (B, tokens, C) backbone features."""
    features = cache.features.get("image")
    source = features.values if features is not None else cache.images
    return torch.from_numpy(np.ascontiguousarray(source[image_rows]))


def gather_audio_input(cache: PreparedCache, rows: np.ndarray, max_frames: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the audio encoder takes, with its mask (B, T) and has_audio (B,): log-mel (see
    gather_audio, cut to `max_frames`), or fp16 backbone features (B, T, C) / int16 waveforms
    (B, samples) from the cache's audio feature set (cut to max_audio_seconds when built)."""
    features = cache.features.get("audio")
    if features is None:
        return gather_audio(cache, rows, max_frames)
    values, lengths = features.padded(rows)
    mask = np.arange(values.shape[1])[None, :] < lengths[:, None]
    return (torch.from_numpy(values), torch.from_numpy(mask),
            torch.from_numpy(cache.mel_lengths[rows] > 0))


def audio_as_float(audio: torch.Tensor) -> torch.Tensor:
    """Gathered audio as the model takes it: int16 PCM to a waveform in [-1, 1], the rest fp32."""
    if audio.dtype == torch.int16:
        return audio.float() / PCM_SCALE
    return audio.float()


def augment_images(images: torch.Tensor, generator: torch.Generator, crop: bool = True,
                   flip: bool = True) -> torch.Tensor:
    """Random-resized crop (area 0.7-1, aspect 3/4-4/3) and/or horizontal flip of a float batch.

    The parameters are drawn on the CPU from `generator` (identical on any device); one
    bilinear grid_sample then resamples the whole batch where it lives.
    """
    b = images.shape[0]
    area = torch.empty(b).uniform_(*CROP_AREA, generator=generator)
    ratio = torch.empty(b).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]),
                                    generator=generator).exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    # every draw is made whatever is switched on, so one switch never changes the other's draws
    if not crop:
        width, height, cx, cy = torch.ones(b), torch.ones(b), torch.zeros(b), torch.zeros(b)
    if not flip:
        sign = torch.ones(b)
    return resample_crops(images, width, height, cx, cy, sign)


def resample_crops(images: torch.Tensor, width: torch.Tensor, height: torch.Tensor,
                   cx: torch.Tensor, cy: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Each image of a float batch resampled from its crop: (B,) width and height as shares of
    the side, centre cx, cy in [-1, 1], sign -1 to flip horizontally."""
    b, _, h, w = images.shape
    # Without rotation the sampling grid is separable: x depends on the column only and y on
    # the row only, so it is built by broadcasting (what affine_grid computes with a matmul).
    opts = {"device": images.device, "dtype": images.dtype}
    xs = (torch.arange(w, **opts) * 2 + 1) / w - 1  # pixel centres, align_corners=False
    ys = (torch.arange(h, **opts) * 2 + 1) / h - 1
    gx = (width * sign).to(**opts)[:, None] * xs + cx.to(**opts)[:, None]
    gy = height.to(**opts)[:, None] * ys + cy.to(**opts)[:, None]
    grid = torch.stack((gx[:, None, :].expand(b, h, w), gy[:, :, None].expand(b, h, w)), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pin(batch: dict[str, Any], pin: bool) -> dict[str, Any]:
    if not pin:
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetch(fn: Callable[[Any], Any], items: list[Any], depth: int = PREFETCH_DEPTH) -> Iterator[Any]:
    """Yield fn(item) for each item, computing up to `depth` results ahead on a thread."""
    results: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(obj, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(fn(item)):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))

    thread = threading.Thread(target=work, name="nlmm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            out = results.get()
            if out is _DONE:
                return
            if isinstance(out, _Failure):
                raise out.exc
            yield out
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- training batches

class TrainLoader:
    """Shuffled (image, caption, spoken caption) batches of one split for one epoch."""

    def __init__(self, cache: PreparedCache, split: str, batch_size: int, *, seed: int,
                 epoch: int = 0, shuffle: bool = True, drop_last: bool = True,
                 device: torch.device | str = "cpu", crop: bool = False, flip: bool = False,
                 max_audio_frames: int | None = None, start_batch: int = 0,
                 prefetch_depth: int = PREFETCH_DEPTH,
                 modalities: tuple[str, ...] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache = cache
        self.rows = cache.split_captions(split)
        self.batch_size = batch_size
        self.seed, self.epoch = seed, epoch
        self.shuffle, self.drop_last = shuffle, drop_last
        self.device = torch.device(device)
        self.crop, self.flip = crop, flip
        self.max_audio_frames = max_audio_frames
        self.start_batch = start_batch
        # only what both the corpus and the model have is gathered
        self.modalities = tuple(m for m in cache.modalities()
                                if modalities is None or m in modalities)
        self.prefetch_depth = max(1, prefetch_depth)
        if len(self) == 0:
            raise NlmmError(f"the {split} split has {len(self.rows)} caption(s), fewer than one "
                            f"batch of {batch_size}; lower train.batch_size or use more data.")

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> np.ndarray:
        """Caption rows of the whole epoch in the order they are served."""
        if not self.shuffle:
            return self.rows
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return self.rows[torch.randperm(len(self.rows), generator=g).numpy()]

    def _augment_seed(self, batch_index: int) -> int:
        return ((self.seed * 1000003 + self.epoch) * 7919 + batch_index) % (2**63)

    def _images(self, images: torch.Tensor, batch_index: int) -> torch.Tensor:
        if images.dtype != torch.uint8:  # cached backbone features: fixed, nothing to augment
            return images.float()
        images = normalize_images(images)
        if self.crop or self.flip:
            g = torch.Generator().manual_seed(self._augment_seed(batch_index))
            images = augment_images(images, g, self.crop, self.flip)
        return images

    def _gather(self, job: tuple[int, np.ndarray]) -> dict[str, Any]:
        index, rows = job
        image_rows = self.cache.caption_image(rows)
        text, text_mask = gather_text(self.cache, rows)
        batch = {"text": text, "text_mask": text_mask,
                 "image_ids": torch.from_numpy(image_rows),
                 "caption_ids": torch.from_numpy(rows.astype(np.int64))}
        if "image" in self.modalities:
            batch["image"] = gather_images(self.cache, image_rows)
            batch["has_image"] = torch.from_numpy(self.cache.group_has_image[image_rows].copy())
        if "audio" in self.modalities:
            audio, audio_mask, has_audio = gather_audio_input(self.cache, rows,
                                                              self.max_audio_frames)
            batch.update(audio=audio, audio_mask=audio_mask, has_audio=has_audio)
        if self.device.type == "cpu":
            # On the CPU the image work is the costly part: done here, on the prefetch thread,
            # it overlaps with the training step of the previous batch.
            return {"index": index, **self._finish(batch, index)}
        return {"index": index, **_pin(batch, self.device.type == "cuda")}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order()
        jobs = [(b, order[b * self.batch_size:(b + 1) * self.batch_size])
                for b in range(self.start_batch, len(self))]
        for batch in prefetch(self._gather, jobs, self.prefetch_depth):
            index = batch.pop("index")
            if self.device.type != "cpu":
                batch = self._finish(_to_device(batch, self.device), index)
            yield batch

    def _finish(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        if "image" in batch:
            batch["image"] = self._images(batch["image"], index)
        if "audio" in batch:
            batch["audio"] = audio_as_float(batch["audio"])
        return batch


# --------------------------------------------------------------------------- evaluation passes

def modality_rows(cache: PreparedCache, split: str, modality: str,
                  source: int | None = None) -> np.ndarray:
    """Rows served by iter_modality: a split's images, its captions, or its audio items (a
    spoken caption, or one row per clip); with `source`, only that corpus's."""
    if modality == "image":
        return cache.split_images(split, source)
    if modality == "text":
        return cache.split_captions(split, source)
    if modality == "audio":
        return cache.split_audio_captions(split, source)
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def owner_images(cache: PreparedCache, split: str, modality: str,
                 source: int | None = None) -> np.ndarray:
    """Group row of each item iter_modality yields, in the same order (images: themselves)."""
    rows = modality_rows(cache, split, modality, source)
    return rows.astype(np.int64) if modality == "image" else cache.caption_image(rows)


def iter_modality(cache: PreparedCache, split: str, modality: str, batch_size: int,
                  device: torch.device | str = "cpu", source: int | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, np.ndarray]]:
    """(x, mask, rows) over every item of one modality of a split, fixed order, no augmentation
    (images and audio as backbone features when the cache carries them, see the module doc)."""
    device = torch.device(device)
    rows = modality_rows(cache, split, modality, source)
    pin = device.type == "cuda"

    def gather(chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        if modality == "image":
            x, mask = gather_images(cache, chunk), None
        elif modality == "text":
            x, mask = gather_text(cache, chunk)
        else:
            x, mask, _ = gather_audio_input(cache, chunk)
        if pin:
            x, mask = x.pin_memory(), mask.pin_memory() if mask is not None else None
        return x, mask, chunk

    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    for x, mask, chunk in prefetch(gather, chunks):
        x = x.to(device, non_blocking=True)
        if modality == "image":
            x = normalize_images(x) if x.dtype == torch.uint8 else x.float()
        elif modality == "audio":
            x = audio_as_float(x)
        yield x, mask.to(device, non_blocking=True) if mask is not None else None, chunk
