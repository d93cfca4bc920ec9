"""Training and evaluation batches streamed from a pack (nlmm.data.packed) with litdata.

Shards are read from a folder or an s3:// prefix; decoding the stored images (small JPEG/PNG at
the training size), tokenization and image augmentation run in the loader's worker processes
(log-mels were computed when the pack was made), which hand over
finished batches in the batch contract of nlmm.data.loader.TrainLoader:

    text (B, L) int64, text_mask (B, L) bool       one caption per row, trimmed to the longest
    image (B, 3, S, S) float32, has_image (B,)     normalised; zeros where a group has no image
    audio (B, 1, n_mels, T) float32, audio_mask (B, T) bool, has_audio (B,)
                                                   log-mel of the caption's reading, else of
                                                   the group's clip; all-False mask without
    image_ids (B,) int64                           dense group index: equal ids are positives
    caption_ids (B,) int64                         dense caption index over the whole pack

A training epoch serves every group once (or `samples_per_epoch` of them); which caption of a
group a row carries is fixed by (seed, epoch, group). The order is litdata's: chunks shuffled
by (seed, epoch), each chunk fully permuted, batches dealt to ranks and workers.
`state_dict()` after any batch, `load_state_dict()` on a fresh loader of the same epoch, and the
resumed loader serves exactly the batches the first would have served next. With another number
of workers it serves them in the same order, less the epoch's last few batches when they no
longer fill a round of the workers. With another number of ranks litdata re-deals the rest of
the epoch: no sample is served twice, at most one global batch is skipped (STREAM_NOTES.md).

Ranks are passed in, never guessed: litdata would read WORLD_SIZE and GLOBAL_RANK (torchrun
sets RANK, not GLOBAL_RANK), so they are set around the calls that read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from litdata.utilities.env import _DistributedEnv

from nlmm.config import DataConfig
from nlmm.data.features import load_image, normalize_images
from nlmm.data.loader import augment_images
from nlmm.data.packed import (caption_readings, check_features, corrupted_shard_error,
                              open_store, read_manifest, read_tokenizer, sha256_file,
                              store_error_context)
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

STATE_VERSION = 1
_ERROR = "__nlmm_error__"


# --------------------------------------------------------------------------- decoding bytes

def image_from_bytes(data: bytes, size: int) -> np.ndarray:
    """uint8 (3, size, size) of a stored image (already that size: the resize is a no-op),
    decoded as features.load_image decodes a file (PIL reads file objects too)."""
    return load_image(io.BytesIO(data), size)  # type: ignore[arg-type]


def _mix(*values: int) -> int:
    """A stable 63-bit hash of integers (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(np.asarray(values, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def caption_choice(seed: int, epoch: int, group: int, n_captions: int) -> int:
    """Which caption of a group its training row carries in `epoch`."""
    return _mix(seed, epoch, group) % n_captions


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


class Collate:
    """Turns a list of stored samples into a batch; runs in the loader workers.

    mode 'train': one row per group (a caption chosen by caption_choice), images augmented
    with a generator seeded by (seed, epoch, the batch's groups), so a batch is augmented the
    same way whichever worker builds it and whether or not the run was resumed.
    mode 'eval': image rows per group and text/audio rows per caption (see iter_split).
    """

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, *, mode: str = "train",
                 seed: int = 0, epoch: int = 0, crop: bool = False, flip: bool = False) -> None:
        self.cfg, self.tokenizer, self.mode = cfg, tokenizer, mode
        self.seed, self.epoch, self.crop, self.flip = seed, epoch, crop, flip

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        errors = [s[_ERROR] for s in samples if _ERROR in s]
        if errors:
            return {_ERROR: errors[0]}
        return self._train(samples) if self.mode == "train" else self._eval(samples)

    @staticmethod
    def _mel(mel: np.ndarray) -> np.ndarray | None:
        return mel.astype(np.float32) if mel.shape[1] else None

    def _train(self, samples: list[dict]) -> dict[str, Any]:
        groups = np.array([s["group"] for s in samples], dtype=np.int64)
        texts, mels, caption_ids = [], [], []
        for s, group in zip(samples, groups, strict=True):
            captions = json.loads(s["captions"])
            k = caption_choice(self.seed, self.epoch, int(group), len(captions))
            texts.append(captions[k])
            caption_ids.append(s["caption_base"] + k)
            own = caption_readings(s)[k]
            mels.append(self._mel(own if own.shape[1] else s["clip"]))
        text, text_mask = _tokens(self.tokenizer, texts, self.cfg.text_max_len)
        images, has_image = _images(samples, self.cfg.image_size)
        images = normalize_images(images)
        if self.crop or self.flip:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, *groups.tolist()))
            images = augment_images(images, g, self.crop, self.flip)
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
                mels.append(self._mel(readings[k] if readings[k].shape[1] or k else s["clip"]))
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


# --------------------------------------------------------------------------- litdata plumbing

@contextlib.contextmanager
def rank_env(rank: int, world_size: int) -> Iterator[None]:
    """WORLD_SIZE / GLOBAL_RANK / NNODES as litdata reads them, for the duration of a call.

    One node always: litdata's multi-node shuffle depends on the node count, and a pack's order
    should not change when the same ranks are spread over other machines.
    """
    new = {"WORLD_SIZE": str(world_size), "GLOBAL_RANK": str(rank), "NNODES": "1"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _allow_plain_http(storage_options: dict[str, Any] | None) -> None:
    """litdata downloads chunks with obstore, whose client refuses http:// endpoints unless
    told (litdata 0.2.76 passes fixed client options); a local MinIO or moto speaks http."""
    endpoint = (storage_options or {}).get("endpoint_url") or os.environ.get(
        "AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True


def _quiet_litdata() -> None:
    # litdata warns about cache sizes under 25 GB and logs its elastic-resume steps; nlmm's
    # users act on nlmm's messages, not on those.
    logging.getLogger("litdata").setLevel(logging.ERROR)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core is the parallelism (nlmm.data.parallel)


class PackDataset(StreamingDataset):
    """A StreamingDataset that checks each chunk's sha256 against the pack's manifest the first
    time a process reads from it; a mismatch becomes an error item that the training process
    raises as one sentence (raised in a worker, torch would wrap it in a traceback)."""

    def __init__(self, *args: Any, shards: dict[str, dict], label: str, split: str,
                 verify: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shards, self._label, self._split, self._verify = shards, label, split, verify
        self._checked: dict[int, str | None] = {}

    def _check(self, index: ChunkedIndex) -> str | None:
        """The error sentence when the chunk is corrupted; hashes it once per process, as soon
        as it is on local disk (at once for a local pack, after the first read for a remote
        one)."""
        if index.chunk_index not in self._checked:
            path, _, _ = self.cache._reader.config[index]
            if not os.path.exists(path):
                return None
            name = os.path.basename(path)
            want = self._shards.get(name, {}).get("sha256")
            bad = want is not None and sha256_file(Path(path)) != want
            self._checked[index.chunk_index] = (
                str(corrupted_shard_error(self._label, f"{self._split}/{name}",
                                          "its sha256 differs from nlmm_pack.json"))
                if bad else None)
        return self._checked[index.chunk_index]

    def __getitem__(self, index: Any) -> Any:
        item = self._read(index)
        if _ERROR not in item:
            # a shard counts its groups and captions from 0; the pack's offsets make them dense
            path, _, _ = self.cache._reader.config[index]
            meta = self._shards[os.path.basename(path)]
            item["group"] += meta["first_group"]
            item["caption_base"] += meta["first_caption"]
        return item

    def _read(self, index: Any) -> Any:
        if not self._verify:
            return super().__getitem__(index)
        if error := self._check(index):
            return {_ERROR: error}
        try:
            item = super().__getitem__(index)
        except Exception:
            if error := self._check(index):  # garbage read from a corrupted chunk
                return {_ERROR: error}
            raise
        if error := self._check(index):
            return {_ERROR: error}
        return item


class _Pack:
    """A pack opened for reading one split: manifest, shard sizes checked, tokenizer."""

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
        prefix = f"{split}/"
        self.shards = {k[len(prefix):]: v for k, v in self.manifest["shards"].items()
                       if k.startswith(prefix)}
        self._check_sizes()

    def _check_sizes(self) -> None:
        """A missing or truncated shard is named now, before litdata waits on it."""
        store = open_store(self.url, self.storage_options)
        with store_error_context(store):
            sizes = store.sizes(f"{self.split}/")
        for name, meta in sorted(self.shards.items()):
            got = sizes.get(f"{self.split}/{name}")
            if got != meta["bytes"]:
                why = "it is missing" if got is None else f"{got} bytes, not {meta['bytes']}"
                raise corrupted_shard_error(self.url, f"{self.split}/{name}", why)

    def dataset(self, *, shuffle: bool, seed: int, drop_last: bool, rank: int, world_size: int,
                verify: bool, cache_dir: str | None, max_cache_size: int | str | None) -> Any:
        _quiet_litdata()
        _allow_plain_http(self.storage_options)
        # litdata's default shuffles a chunk in fixed aligned blocks of 256 items: a batch would
        # draw its in-batch negatives from the same 256 groups every epoch. A full permutation
        # of the chunk per epoch instead, read one item at a time (batch_decode=0); fast because
        # packs keep litdata's per-item chunk layout (see packed.make_sample).
        window = {"item_shuffle_window": 0, "batch_decode": 0} if shuffle else {}
        with rank_env(rank, world_size):
            ds = PackDataset(f"{self.url}/{self.split}", shuffle=shuffle, seed=seed,
                             drop_last=drop_last, storage_options=self.storage_options,
                             cache_dir=cache_dir, max_cache_size=max_cache_size, **window,
                             shards=self.shards,
                             label=self.url, split=self.split, verify=verify)
        ds.distributed_env = _DistributedEnv(world_size, rank, 1)
        return ds


def _first_then_rest(make_iter, rank: int, world_size: int) -> Iterator[Any]:
    """Iterate a litdata loader with the rank variables set while its workers start (they read
    them when they open the chunks), then without."""
    with rank_env(rank, world_size):
        it = iter(make_iter())
        try:
            first = next(it)
        except StopIteration:
            return
    yield first
    yield from it


def _raise_errors(batch: dict[str, Any]) -> dict[str, Any]:
    if _ERROR in batch:
        raise NlmmError(batch[_ERROR])
    return batch


# --------------------------------------------------------------------------- training

class StreamTrainLoader:
    """One epoch of shuffled training batches of a packed split, for one rank.

    Construct one per epoch (epoch 0-based, as nlmm.data.loader.TrainLoader). To resume
    mid-epoch, give the saved `state_dict()` to `load_state_dict()` of a loader built for the
    same epoch before iterating; `start_batch` does the same from a batch count alone, exact
    when the number of ranks and workers is what it was.
    """

    def __init__(self, input_dir: str | Path, split: str = "train", *, batch_size: int, seed: int,
                 data_cfg: DataConfig, epoch: int = 0, tokenizer: TextTokenizer | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 samples_per_epoch: int | None = None, crop: bool = False, flip: bool = False,
                 start_batch: int = 0, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None, max_cache_size: int | str | None = None,
                 verify_shards: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.pack = _Pack(input_dir, split, storage_options, data_cfg)
        self.tokenizer = tokenizer or read_tokenizer(self.pack.url, storage_options)
        self.split, self.batch_size, self.seed, self.epoch = split, batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.samples_per_epoch = samples_per_epoch
        self.cfg, self.crop, self.flip = data_cfg, crop, flip
        self._opts = {"cache_dir": cache_dir, "max_cache_size": max_cache_size,
                      "verify": verify_shards}
        per_rank = (self.pack.groups // batch_size) // world_size  # litdata's deal, drop_last
        if per_rank == 0:
            raise NlmmError(
                f"the {split} split of {self.pack.url} has {self.pack.groups} groups, fewer than "
                f"one batch of {batch_size} for each of {world_size} rank(s); lower the batch "
                "size or the number of ranks, or pack more data.")
        # Workers without a batch would only be forked to exit; fewer workers never changes
        # which samples an epoch serves, only the order in which they are dealt.
        self.num_workers = min(num_workers, per_rank)
        budget = per_rank if samples_per_epoch is None else min(
            per_rank, samples_per_epoch // (world_size * batch_size))
        if budget == 0:
            raise NlmmError(f"samples_per_epoch={samples_per_epoch} is less than one batch of "
                            f"{batch_size} on each of {world_size} rank(s); raise it.")
        self._length = budget
        self._done = 0
        self._resume: dict[str, Any] | None = None
        self._loader: Any = None
        if start_batch:
            self._resume_from_count(start_batch)

    def __len__(self) -> int:
        """Batches this rank serves in the epoch (every rank serves the same number)."""
        return self._length

    @property
    def batches_done(self) -> int:
        return self._done

    def _new_loader(self) -> Any:
        ds = self.pack.dataset(shuffle=True, seed=self.seed, drop_last=True, rank=self.rank,
                               world_size=self.world_size, **self._opts)
        collate = Collate(self.cfg, self.tokenizer, mode="train", seed=self.seed,
                          epoch=self.epoch, crop=self.crop, flip=self.flip)
        loader = StreamingDataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                                     collate_fn=collate, drop_last=True,
                                     worker_init_fn=_worker_init if self.num_workers else None)
        loader.current_epoch = self.epoch  # litdata counts epochs from 1 and adds one per pass
        return loader

    def _resume_from_count(self, batches: int) -> None:
        """The litdata state that a run with this topology has after `batches` batches: it is a
        function of the count (samples yielded, the next worker) and the dataset settings."""
        ds = self._new_loader().dataset
        ds.get_len(self.num_workers, self.batch_size)  # resolves input_dir as a real run has it
        ds.set_epoch(self.epoch + 1)
        n = batches * self.batch_size
        state = {"dataset": ds.state_dict(n, self.num_workers, self.batch_size),
                 "current_epoch": self.epoch + 1, "num_samples_yielded": n,
                 "latest_worker_idx": (batches - 1) % max(1, self.num_workers)}
        self._done, self._resume = batches, state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._done >= self._length:
            return
        if self._loader is not None:  # iterated before and stopped early: go on from there
            self._resume = self._loader.state_dict()
        self._loader = loader = self._new_loader()
        if self._resume is not None and self._done > 0:
            with rank_env(self.rank, self.world_size):
                loader.load_state_dict(self._resume)
        batches = _first_then_rest(lambda: loader, self.rank, self.world_size)
        try:
            for batch in batches:
                batch = _raise_errors(batch)
                self._done += 1
                yield batch
                if self._done >= self._length:
                    break
        finally:
            batches.close()  # stops the workers of a budget that ends before litdata's epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch; call it between batches, in the training process."""
        if self._loader is not None:
            litdata_state = self._loader.state_dict()
        else:
            litdata_state = self._resume
        return {"version": STATE_VERSION, "input_dir": self.pack.url, "split": self.split,
                "epoch": self.epoch, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "samples_per_epoch": self.samples_per_epoch,
                "batches_done": self._done, "litdata": litdata_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from state_dict of a loader of this epoch, any rank count)."""
        if state.get("version") != STATE_VERSION:
            raise NlmmError(f"the saved loader state has version {state.get('version')}, this "
                            f"nlmm reads {STATE_VERSION}; resume from the epoch's start instead.")
        if state["input_dir"] != self.pack.url:
            raise NlmmError(f"the saved loader state is for the pack in {state['input_dir']}, this "
                            f"loader reads {self.pack.url}; resume from the same pack.")
        for key in ("split", "epoch", "seed", "batch_size", "samples_per_epoch"):
            if state[key] != getattr(self, key):
                raise NlmmError(f"the saved loader state is for {key}={state[key]!r}, this loader "
                                f"has {getattr(self, key)!r}; resume with the run's own settings.")
        done, resume = int(state["batches_done"]), state["litdata"]
        if state["world_size"] != self.world_size and resume is not None:
            # litdata re-deals the rest of the epoch, starting at the samples taken so far
            # rounded DOWN to whole global batches of the new world size: up to one global
            # batch would be served twice. Rounding up instead skips those few samples for
            # this epoch, so no sample is ever seen twice in an epoch.
            stride = self.world_size * self.batch_size
            taken = int(resume["dataset"].get("sample_in_epoch",
                                              done * state["world_size"] * self.batch_size))
            taken = -(-taken // stride) * stride
            resume = {**resume, "dataset": {**resume["dataset"], "sample_in_epoch": taken}}
            done = taken // stride
        self._done, self._resume = done, resume


# --------------------------------------------------------------------------- evaluation

def iter_split(input_dir: str | Path, split: str, *, batch_size: int, data_cfg: DataConfig,
               tokenizer: TextTokenizer | None = None, num_workers: int = 0, rank: int = 0,
               world_size: int = 1, storage_options: dict[str, Any] | None = None,
               cache_dir: str | None = None, max_cache_size: int | str | None = None,
               verify_shards: bool = True) -> Iterator[dict[str, Any]]:
    """Every group of a split once, in a fixed order, `batch_size` groups at a time.

    Each batch: image, has_image, image_ids (and group_id, the corpus's names) with one row per
    group; text, text_mask, audio, audio_mask, has_audio, caption_ids and caption_group (its
    group's index) with one row per caption of those groups. Memory holds one batch per worker,
    whatever the split's size.
    """
    pack = _Pack(input_dir, split, storage_options, data_cfg)
    tokenizer = tokenizer or read_tokenizer(pack.url, storage_options)
    ds = pack.dataset(shuffle=False, seed=0, drop_last=False, rank=rank, world_size=world_size,
                      verify=verify_shards, cache_dir=cache_dir, max_cache_size=max_cache_size)
    workers = min(num_workers, max(1, math.ceil(pack.groups / batch_size)))
    loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers,
                                 collate_fn=Collate(data_cfg, tokenizer, mode="eval"),
                                 drop_last=False,
                                 worker_init_fn=_worker_init if workers else None)
    for batch in _first_then_rest(lambda: loader, rank, world_size):
        yield _raise_errors(batch)


__all__ = ["StreamTrainLoader", "iter_split", "Collate", "caption_choice", "image_from_bytes",
           "rank_env"]
