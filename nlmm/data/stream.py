"""Training and evaluation batches streamed from a pack (nlmm.data.packed).

Shards are read from a folder or an s3:// prefix (nlmm.data.pack_reader); decoding the stored
images (small JPEG/PNG at the training size), tokenization and image augmentation run in the
loader's worker processes (log-mels were computed when the pack was made), which hand over
finished batches in the batch contract of nlmm.data.loader.TrainLoader:

    text (B, L) int64, text_mask (B, L) bool       one caption per row, trimmed to the longest
    image (B, 3, S, S) float32, has_image (B,)     normalised; zeros where a group has no image
    audio (B, 1, n_mels, T) float32, audio_mask (B, T) bool, has_audio (B,)
                                                   log-mel of the caption's reading, else of
                                                   the group's clip; all-False mask without
    image_ids (B,) int64                           dense group index: equal ids are positives
    caption_ids (B,) int64                         dense caption index over the whole pack

A training epoch serves every group once (or `samples_per_epoch` of them) in the order of
nlmm.data.stream_order: a function of (seed, epoch, global batch) only. Which caption of a group
a row carries is fixed by (seed, epoch, group), and so is its image augmentation. A loader's
state is the number of global steps served: `state_dict()` after any batch and
`load_state_dict()` on a fresh loader of the same epoch, with any number of ranks and workers,
serve exactly the rows an uninterrupted run serves next.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nlmm.config import DataConfig
from nlmm.data.features import load_image, normalize_images
from nlmm.data.loader import CROP_AREA, CROP_RATIO, resample_crops
from nlmm.data.pack_block import caption_readings
from nlmm.data.pack_index import (check_features, corrupted_shard_error, read_manifest,
                                  read_tokenizer)
from nlmm.data.pack_reader import Shard, ShardReader, split_shards
from nlmm.data.pack_store import open_store, store_error_context
from nlmm.data.stream_order import EpochOrder, SplitOrder, mix, uniforms
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

STATE_VERSION = 2  # 2: the state is the global steps served (any ranks and workers)
_ERROR = "__nlmm_error__"


# --------------------------------------------------------------------------- one row

def image_from_bytes(data: bytes, size: int) -> np.ndarray:
    """uint8 (3, size, size) of a stored image (already that size: the resize is a no-op),
    decoded as features.load_image decodes a file (PIL reads file objects too)."""
    return load_image(io.BytesIO(data), size)  # type: ignore[arg-type]


def caption_choice(seed: int, epoch: int, group: int, n_captions: int) -> int:
    """Which caption of a group its training row carries in `epoch`."""
    return mix(seed, epoch, group) % n_captions


def augment_rows(images: torch.Tensor, groups: np.ndarray, seed: int, epoch: int, crop: bool,
                 flip: bool) -> torch.Tensor:
    """loader.augment_images' random-resized crop and flip, each row drawn from (seed, epoch,
    its group) alone: a sample is augmented the same way in any batch, on any rank."""
    n = len(groups)
    u = torch.from_numpy(uniforms(mix(seed, epoch, -2), groups, 5)).float()
    area = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[0]
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = (lo + (hi - lo) * u[1]).exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    cx, cy = (u[2] * 2 - 1) * (1 - width), (u[3] * 2 - 1) * (1 - height)
    sign = torch.where(u[4] < 0.5, -1.0, 1.0)
    if not crop:
        width, height, cx, cy = torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
    if not flip:
        sign = torch.ones(n)
    return resample_crops(images, width, height, cx, cy, sign)


# --------------------------------------------------------------------------- batches

def _pad_mels(mels: list[np.ndarray | None], n_mels: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = np.array([0 if m is None else m.shape[1] for m in mels], dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)))
    out = np.zeros((len(mels), n_mels, width), dtype=np.float32)
    for i, m in enumerate(mels):
        if m is not None:
            out[i, :, :m.shape[1]] = m
    mask = np.arange(width)[None, :] < lengths[:, None]
    return torch.from_numpy(out).unsqueeze(1), torch.from_numpy(mask), torch.from_numpy(lengths > 0)


def _tokens(tokenizer: TextTokenizer, texts: list[str], max_len: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = tokenizer.encode_batch(texts, max_len)
    width = max(1, int(lengths.max(initial=0)))
    mask = np.arange(width)[None, :] < lengths[:, None]
    return torch.from_numpy(ids[:, :width].astype(np.int64)), torch.from_numpy(mask)


def _images(samples: list[dict], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.zeros((len(samples), 3, size, size), dtype=np.uint8)
    has = np.zeros(len(samples), dtype=bool)
    for i, s in enumerate(samples):
        if s["image"]:
            images[i] = image_from_bytes(s["image"], size)
            has[i] = True
    return torch.from_numpy(images), torch.from_numpy(has)


def _mel(mel: np.ndarray) -> np.ndarray | None:
    return mel.astype(np.float32) if mel.shape[1] else None


class Collate:
    """Turns a list of stored samples into a batch; runs in the loader workers.

    mode 'train': one row per group (a caption chosen by caption_choice), images augmented per
    row (augment_rows). mode 'eval': image rows per group and text/audio rows per caption (see
    iter_split).
    """

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, *, mode: str = "train",
                 seed: int = 0, epoch: int = 0, crop: bool = False, flip: bool = False) -> None:
        self.cfg, self.tokenizer, self.mode = cfg, tokenizer, mode
        self.seed, self.epoch, self.crop, self.flip = seed, epoch, crop, flip

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        return self._train(samples) if self.mode == "train" else self._eval(samples)

    def _train(self, samples: list[dict]) -> dict[str, Any]:
        groups = np.array([s["group"] for s in samples], dtype=np.int64)
        texts, mels, caption_ids = [], [], []
        for s, group in zip(samples, groups, strict=True):
            captions = json.loads(s["captions"])
            k = caption_choice(self.seed, self.epoch, int(group), len(captions))
            texts.append(captions[k])
            caption_ids.append(s["caption_base"] + k)
            own = caption_readings(s)[k]
            mels.append(_mel(own if own.shape[1] else s["clip"]))
        text, text_mask = _tokens(self.tokenizer, texts, self.cfg.text_max_len)
        images, has_image = _images(samples, self.cfg.image_size)
        images = normalize_images(images)
        if self.crop or self.flip:
            images = augment_rows(images, groups, self.seed, self.epoch, self.crop, self.flip)
        images[~has_image] = 0.0
        audio, audio_mask, has_audio = _pad_mels(mels, self.cfg.n_mels)
        return {"text": text, "text_mask": text_mask, "image": images, "has_image": has_image,
                "audio": audio, "audio_mask": audio_mask, "has_audio": has_audio,
                "image_ids": torch.from_numpy(groups),
                "caption_ids": torch.tensor(caption_ids, dtype=torch.int64)}

    def _eval(self, samples: list[dict]) -> dict[str, Any]:
        texts, mels, caption_ids, caption_group, own = [], [], [], [], []
        for s in samples:
            readings = caption_readings(s)
            for k, text in enumerate(json.loads(s["captions"])):
                texts.append(text)
                caption_ids.append(s["caption_base"] + k)
                caption_group.append(s["group"])
                own.append(bool(readings[k].shape[1]))
                # a group's clip is one gallery item, carried by its first caption's row only
                mels.append(_mel(readings[k] if readings[k].shape[1] or k else s["clip"]))
        text, text_mask = _tokens(self.tokenizer, texts, self.cfg.text_max_len)
        images, has_image = _images(samples, self.cfg.image_size)
        images = normalize_images(images)
        images[~has_image] = 0.0
        audio, audio_mask, has_audio = _pad_mels(mels, self.cfg.n_mels)
        return {"text": text, "text_mask": text_mask, "image": images, "has_image": has_image,
                "audio": audio, "audio_mask": audio_mask, "has_audio": has_audio,
                "image_ids": torch.tensor([s["group"] for s in samples], dtype=torch.int64),
                "caption_ids": torch.tensor(caption_ids, dtype=torch.int64),
                "caption_group": torch.tensor(caption_group, dtype=torch.int64),
                "own_audio": torch.tensor(own, dtype=torch.bool),
                "group_id": [s["group_id"] for s in samples]}


# --------------------------------------------------------------------------- workers

class _Steps(Dataset):
    """Batch k of a loader as item k of a map-style dataset: torch's DataLoader hands index k
    to worker k mod w and yields the batches in index order, so the order does not depend on
    the number of workers. A remote pack's chunks are fetched a step ahead of the first read
    and deleted once every step that reads them is a margin behind (a slower worker may still
    be on an earlier step; it would fetch a chunk again, never read a wrong one)."""

    def __init__(self, reader: ShardReader, rows: Any, spans: dict[int, tuple[int, int]],
                 collate: Collate, workers: int) -> None:
        self.reader, self.rows, self.spans, self.collate = reader, rows, spans, collate
        self.margin = 2 * max(1, workers) + 2
        self.steps = max((last for _, last in spans.values()), default=-1) + 1

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, Any]:
        try:
            if self.reader.remote:
                self._cache(step)
            return self.collate(self.reader.read(self.rows(step)))
        except NlmmError as exc:  # a corrupted shard, an object store that refuses
            # returned, not raised: torch would wrap it in a worker traceback
            return {_ERROR: str(exc)}

    def _cache(self, step: int) -> None:
        for chunk, (first, last) in self.spans.items():
            if first <= step + 1 and last >= step:
                self.reader.fetch(chunk)
        for chunk in self.reader.cached():
            first, last = self.spans.get(chunk, (-1, -1))
            if last < step - self.margin:
                self.reader.release(chunk)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core is the parallelism (nlmm.data.parallel)


def _serve(steps: _Steps, start: int, workers: int) -> Iterator[dict[str, Any]]:
    loader = DataLoader(steps, batch_size=None, sampler=range(start, len(steps)),
                        num_workers=workers, worker_init_fn=_worker_init if workers else None)
    for batch in loader:
        if _ERROR in batch:
            raise NlmmError(batch[_ERROR])
        yield batch


class _Pack:
    """A pack opened for reading one split: manifest, features checked, shard sizes checked."""

    def __init__(self, input_dir: str | Path, split: str, storage_options: dict[str, Any] | None,
                 data_cfg: DataConfig) -> None:
        self.url = str(input_dir).rstrip("/")
        self.split = split
        self.storage_options = storage_options
        self.manifest = read_manifest(self.url, storage_options)
        check_features(self.manifest, data_cfg, self.url)
        info = self.manifest["splits"].get(split)
        if info is None or info["groups"] == 0:
            raise NlmmError(f"the {split} split of the pack in {self.url} is empty; pick another "
                            "split or pack a corpus that has one.")
        self.groups = int(info["groups"])
        self.shards: list[Shard] = split_shards(self.manifest, split)
        self._check_sizes()

    def _check_sizes(self) -> None:
        """A missing or truncated shard is named now, before any worker starts."""
        store = open_store(self.url, self.storage_options)
        with store_error_context(store):
            sizes = store.sizes(f"{self.split}/")
        for shard in self.shards:
            got = sizes.get(f"{self.split}/{shard.name}")
            if got != shard.bytes:
                why = "it is missing" if got is None else f"{got} bytes, not {shard.bytes}"
                raise corrupted_shard_error(self.url, f"{self.split}/{shard.name}", why)

    def reader(self, *, rank: int, cache_dir: str | None, verify: bool) -> ShardReader:
        return ShardReader(self.url, self.split, self.shards, self.manifest["fingerprint"],
                           storage_options=self.storage_options, cache_dir=cache_dir, rank=rank,
                           verify=verify)


# --------------------------------------------------------------------------- training

class StreamTrainLoader:
    """One epoch of shuffled training batches of a packed split, for one rank: `batch_size`
    rows of each global step of world_size x batch_size rows (stream_order.EpochOrder).

    Construct one per epoch (epoch 0-based, as nlmm.data.loader.TrainLoader). To resume
    mid-epoch, give a saved `state_dict()` to `load_state_dict()` of a loader built for the same
    epoch and global batch before iterating, or pass `start_batch`: the same thing.
    """

    def __init__(self, input_dir: str | Path, split: str = "train", *, batch_size: int, seed: int,
                 data_cfg: DataConfig, epoch: int = 0, tokenizer: TextTokenizer | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 samples_per_epoch: int | None = None, crop: bool = False, flip: bool = False,
                 start_batch: int = 0, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None, verify_shards: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.pack = _Pack(input_dir, split, storage_options, data_cfg)
        self.tokenizer = tokenizer or read_tokenizer(self.pack.url, storage_options)
        self.split, self.seed, self.epoch = split, seed, epoch
        self.global_batch = batch_size * world_size
        self.samples_per_epoch = samples_per_epoch
        self.order = EpochOrder([s.samples for s in self.pack.shards], seed=seed, epoch=epoch,
                                global_batch=self.global_batch,
                                samples_per_epoch=samples_per_epoch)
        if self.order.steps == 0:
            if samples_per_epoch is not None and samples_per_epoch < self.global_batch <= \
                    self.pack.groups:
                raise NlmmError(f"samples_per_epoch={samples_per_epoch} is less than one global "
                                f"batch of {self.global_batch}; raise it.")
            raise NlmmError(
                f"the {split} split of {self.pack.url} has {self.pack.groups} groups, fewer than "
                f"one batch of {batch_size} for each of {world_size} rank(s); lower the batch "
                "size or the number of ranks, or pack more data.")
        self.lanes = self.order.lanes(rank, world_size)
        # workers without a batch would only be forked to exit
        self.num_workers = min(num_workers, self.order.steps)
        self.reader = self.pack.reader(rank=rank, cache_dir=cache_dir, verify=verify_shards)
        self.collate = Collate(data_cfg, self.tokenizer, mode="train", seed=seed, epoch=epoch,
                               crop=crop, flip=flip)
        self._done = start_batch

    def __len__(self) -> int:
        """Batches this rank serves in the epoch: the global steps, the same on every rank."""
        return self.order.steps

    @property
    def batches_done(self) -> int:
        return self._done

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the epoch; iterated again after a break, it goes on from there."""
        if self._done >= self.order.steps:
            return
        steps = _Steps(self.reader, lambda k: self.order.rows(k, self.lanes),
                       self.order.spans(self.lanes), self.collate, self.num_workers)
        batches = _serve(steps, self._done, self.num_workers)
        try:
            for batch in batches:
                self._done += 1
                yield batch
        finally:
            batches.close()  # stops the workers when the caller stops early

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands; call it between batches, in the training process. Every rank's
        is the same, and any rank count resumes from it."""
        return {"version": STATE_VERSION, "input_dir": self.pack.url, "split": self.split,
                "epoch": self.epoch, "seed": self.seed, "global_batch": self.global_batch,
                "samples_per_epoch": self.samples_per_epoch, "steps_done": self._done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (state_dict of a loader of this epoch, any ranks and workers)."""
        if state.get("version") != STATE_VERSION:
            raise NlmmError(f"the saved loader state has version {state.get('version')}, this "
                            f"nlmm reads {STATE_VERSION}; resume from the epoch's start instead.")
        if state["input_dir"] != self.pack.url:
            raise NlmmError(f"the saved loader state is for the pack in {state['input_dir']}, this "
                            f"loader reads {self.pack.url}; resume from the same pack.")
        for key in ("split", "epoch", "seed", "global_batch", "samples_per_epoch"):
            if state[key] != getattr(self, key):
                raise NlmmError(f"the saved loader state is for {key}={state[key]!r}, this loader "
                                f"has {getattr(self, key)!r}; resume with the run's own settings.")
        self._done = int(state["steps_done"])


# --------------------------------------------------------------------------- evaluation

def iter_split(input_dir: str | Path, split: str, *, batch_size: int, data_cfg: DataConfig,
               tokenizer: TextTokenizer | None = None, num_workers: int = 0,
               storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
               verify_shards: bool = True) -> Iterator[dict[str, Any]]:
    """Every group of a split once, in pack order, `batch_size` groups at a time.

    Each batch: image, has_image, image_ids (and group_id, the corpus's names) with one row per
    group; text, text_mask, audio, audio_mask, has_audio, caption_ids and caption_group (its
    group's index) with one row per caption of those groups. Memory holds one batch per worker,
    whatever the split's size.
    """
    pack = _Pack(input_dir, split, storage_options, data_cfg)
    tokenizer = tokenizer or read_tokenizer(pack.url, storage_options)
    order = SplitOrder([s.samples for s in pack.shards], batch_size)
    steps = _Steps(pack.reader(rank=0, cache_dir=cache_dir, verify=verify_shards), order.rows,
                   order.spans(), Collate(data_cfg, tokenizer, mode="eval"), num_workers)
    yield from _serve(steps, 0, min(num_workers, order.steps))


__all__ = ["StreamTrainLoader", "iter_split", "Collate", "caption_choice", "image_from_bytes",
           "augment_rows"]
