"""Prepare once, train fast: a versioned, memory-mappable feature cache of a Flickr8k corpus.

`prepare` decodes every image and every wav once, trains the tokenizer on training captions,
and writes arrays plus a manifest holding the parameters, counts, defects and a fingerprint of
the sources. A cache whose parameters or sources differ is rebuilt, never used; it is built in
a temporary folder and renamed into place, so a crash cannot leave a half cache that looks
valid. `PreparedCache` is the read side used by training, evaluation and search.

With `encoders` configured, `prepare` also computes the backbone feature sets that live in the
cache's `features/` folder (see nlmm.data.backbone_features) and returns the cache with them
attached (`PreparedCache.features`), which is what the loaders then serve.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

from nlmm.config import DataConfig, EncodersConfig
from nlmm.data.features import BadInput, load_image, load_log_mel, mel_frames
from nlmm.data.flickr import (SPLITS, CaptionEntry, CheckReport, Defect, ImageEntry, find_layout,
                              read_corpus, tally)
from nlmm.data.parallel import default_workers, map_chunks
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from nlmm.data.backbone_features import FeatureSet

CACHE_VERSION = 1
CACHE_DIR_NAME = ".nlmm_cache"
FEATURE_FIELDS = ("image_size", "sample_rate", "n_mels", "win_length", "hop_length",
                  "max_audio_seconds", "text_max_len")
MANIFEST = "manifest.json"
IMAGES = "images.npy"
MELS = "mels.npy"
TOKENS = "tokens.npy"
INDEX = "index.npz"
ITEMS = "items.json"
TOKENIZER = "tokenizer.json"
ARRAY_FILES = (IMAGES, MELS, TOKENS, INDEX, ITEMS, TOKENIZER)
# Fixed-size .npy header: arrays whose final length is only known at the end (mel frames,
# images after dropping corrupt ones) get their true shape written over it in place.
NPY_HEADER_BYTES = 128
PREPARE_HINT = "run `nlmm data prepare` to rebuild it"


# --------------------------------------------------------------------------- keys and sources

def tokenizer_id(tokenizer: TextTokenizer) -> str:
    return hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:12]


def cache_params(cfg: DataConfig, vocab_size: int,
                 tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
    """The parameters that change the cached features (augmentation does not); with a given
    tokenizer (a trained model's, for another corpus) its identity too."""
    params = {**{f: getattr(cfg, f) for f in FEATURE_FIELDS}, "vocab_size": vocab_size}
    if tokenizer is not None:
        params["tokenizer"] = tokenizer_id(tokenizer)
    return params


def cache_key(cfg: DataConfig, vocab_size: int, tokenizer: TextTokenizer | None = None) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **cache_params(cfg, vocab_size, tokenizer)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir(root: Path, cfg: DataConfig, vocab_size: int,
                      tokenizer: TextTokenizer | None = None) -> Path:
    return Path(root) / CACHE_DIR_NAME / cache_key(cfg, vocab_size, tokenizer)


def source_fingerprint(root: Path) -> str:
    """Hash of (relative path, size, mtime_ns) of every source file plus the text files' bytes.

    Stat-only for the media files keeps this well under a second for the full corpus, so it can
    run on every start; any edit, copy or touch of a file changes it.
    """
    root = Path(root)
    layout = find_layout(root)
    entries: list[tuple[str, int, int]] = []
    for folder in (layout.image_dir, layout.wav_dir):
        if folder is None:
            continue
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file():
                    st = e.stat()
                    entries.append((os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns))
    digest = hashlib.sha256()
    for path in layout.text_files():
        st = path.stat()
        entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
        digest.update(os.path.relpath(path, root).encode() + b"\0" + path.read_bytes() + b"\0")
    for rel, size, mtime in sorted(entries):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _manifest_matches(cache_dir: Path, params: dict[str, Any], root: Path, fingerprint: str) -> bool:
    manifest = _read_manifest(cache_dir)
    # The root must match too: a cache copied along with its corpus still names the old paths.
    return (manifest is not None and manifest.get("version") == CACHE_VERSION
            and manifest.get("params") == params
            and manifest.get("sources") == {"root": str(root), "fingerprint": fingerprint}
            and all((cache_dir / f).is_file() for f in ARRAY_FILES))


def is_fresh(root: Path, cfg: DataConfig, vocab_size: int, cache_dir: Path | None = None) -> bool:
    """True when a cache for these parameters exists and its sources are unchanged."""
    root = Path(root).resolve()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(root, cfg, vocab_size)
    return _manifest_matches(cache_dir, cache_params(cfg, vocab_size), root,
                             source_fingerprint(root))


# --------------------------------------------------------------------------- .npy helpers

def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    desc = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)}
    body = repr(desc).ljust(NPY_HEADER_BYTES - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


def _allocate_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    with open(path, "wb") as fh:
        fh.write(npy_header(shape, dtype))
        fh.truncate(NPY_HEADER_BYTES + int(np.prod(shape)) * np.dtype(dtype).itemsize)


def _shrink_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    with open(path, "r+b") as fh:
        fh.write(npy_header(shape, dtype))
        fh.truncate(NPY_HEADER_BYTES + int(np.prod(shape)) * np.dtype(dtype).itemsize)


# --------------------------------------------------------------------------- workers

def decode_images_chunk(items: list[tuple[int, Path]], size: int,
                        out_path: str) -> list[tuple[int, str | None]]:
    """Decode images straight into their rows of the shared images.npy; (row, reason) each."""
    out = np.load(out_path, mmap_mode="r+")
    results: list[tuple[int, str | None]] = []
    for row, path in items:
        try:
            out[row] = load_image(path, size)
            results.append((row, None))
        except BadInput as exc:
            results.append((row, str(exc)))
    out.flush()
    del out
    return results


def log_mel_chunk(items: list[tuple[int, Path]],
                  cfg: DataConfig) -> list[tuple[int, np.ndarray | None, str | None]]:
    """(caption row, log-mel (T, n_mels) fp16 or None, reason or None) per wav."""
    results: list[tuple[int, np.ndarray | None, str | None]] = []
    for row, path in items:
        try:
            results.append((row, np.ascontiguousarray(load_log_mel(path, cfg).T), None))
        except BadInput as exc:
            results.append((row, None, str(exc)))
    return results


# --------------------------------------------------------------------------- building

def progress_bar(enabled: bool) -> Progress:
    return Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(),
                    TimeRemainingColumn(elapsed_when_finished=True), disable=not enabled)


def _decode_images(images: list[ImageEntry], size: int, out: Path, workers: int | None,
                   bar: Progress, defects: list[Defect]) -> np.ndarray:
    """Fill `out` with every image, drop the ones that fail; returns the kept entry indices."""
    shape = (len(images), 3, size, size)
    _allocate_npy(out, shape, np.uint8)
    task = bar.add_task("images", total=len(images))
    ok = np.zeros(len(images), dtype=bool)
    for chunk in map_chunks(decode_images_chunk, [(i, img.path) for i, img in enumerate(images)],
                            args=(size, str(out)), workers=workers, progress=bar, task=task):
        for row, reason in chunk:
            if reason is None:
                ok[row] = True
            else:
                defects.append(Defect("bad_image", images[row].filename,
                                      f"{reason}; image and its captions skipped"))
    kept = np.flatnonzero(ok)
    if len(kept) < len(images):
        arr = np.load(out, mmap_mode="r+")
        for new, old in enumerate(kept):
            if new != old:
                arr[new] = arr[old]
        arr.flush()
        del arr
        _shrink_npy(out, (len(kept), 3, size, size), np.uint8)
    return kept


def _compute_mels(captions: list[CaptionEntry], cfg: DataConfig, out: Path, workers: int | None,
                  bar: Progress, defects: list[Defect]) -> tuple[np.ndarray, np.ndarray]:
    """Stream every caption's log-mel into one flat (frames, n_mels) array; offsets, lengths."""
    offsets = np.zeros(len(captions), dtype=np.int64)
    lengths = np.zeros(len(captions), dtype=np.int32)
    items = [(row, cap.wav) for row, cap in enumerate(captions) if cap.wav is not None]
    task = bar.add_task("audio", total=len(items))
    total = 0
    with open(out, "wb") as fh:
        fh.write(npy_header((0, cfg.n_mels), np.float16))
        for chunk in map_chunks(log_mel_chunk, items, args=(cfg,), workers=workers,
                                progress=bar, task=task):
            for row, mel, reason in chunk:
                if mel is None:
                    defects.append(Defect("bad_audio", captions[row].wav.name,
                                          f"{reason}; caption kept without audio"))
                    continue
                fh.write(mel.tobytes())
                offsets[row], lengths[row] = total, mel.shape[0]
                total += mel.shape[0]
        fh.seek(0)
        fh.write(npy_header((total, cfg.n_mels), np.float16))
    return offsets, lengths


def _build(root: Path, cfg: DataConfig, vocab_size: int, fingerprint: str, out: Path,
           workers: int | None, progress: bool, given: TextTokenizer | None = None) -> None:
    corpus = read_corpus(root)
    defects = list(corpus.defects)
    order = {s: i for i, s in enumerate(SPLITS)}
    candidates = sorted((img for img in corpus.images if img.split is not None),
                        key=lambda img: (order[img.split], img.filename))
    if not candidates:
        raise NlmmError(f"no image of {root} is listed in a split file, so nothing can be "
                        f"prepared; run `nlmm data check {root}` to see why.")
    seconds: dict[str, float] = {}
    with progress_bar(progress) as bar:
        start = time.perf_counter()
        kept = _decode_images(candidates, cfg.image_size, out / IMAGES, workers, bar, defects)
        seconds["images"] = time.perf_counter() - start
        images = [candidates[i] for i in kept]
        row_of = {img.filename: row for row, img in enumerate(images)}
        captions = sorted((c for c in corpus.captions if c.image in row_of),
                          key=lambda c: (row_of[c.image], c.index))
        split_of = {img.filename: img.split for img in images}
        train_texts = [c.text for c in captions if split_of[c.image] == "train"]
        if not train_texts:
            raise NlmmError(f"the train split of {root} has no usable image-caption pair; "
                            f"run `nlmm data check {root}` to see the defects.")
        start = time.perf_counter()
        offsets, lengths = _compute_mels(captions, cfg, out / MELS, workers, bar, defects)
        seconds["audio"] = time.perf_counter() - start
        start = time.perf_counter()
        task = bar.add_task("tokens", total=len(captions))
        tokenizer = given or TextTokenizer.train(train_texts, vocab_size)
        tokens, token_lengths = tokenizer.encode_batch([c.text for c in captions], cfg.text_max_len)
        bar.advance(task, len(captions))
        seconds["tokens"] = time.perf_counter() - start
    tokenizer.save(out / TOKENIZER)
    np.save(out / TOKENS, tokens)
    np.savez(out / INDEX,
             image_split=np.array([order[img.split] for img in images], dtype=np.int8),
             caption_image=np.array([row_of[c.image] for c in captions], dtype=np.int32),
             caption_index=np.array([c.index for c in captions], dtype=np.int32),
             mel_offsets=offsets, mel_lengths=lengths, token_lengths=token_lengths)
    (out / ITEMS).write_text(json.dumps({
        "image_dir": str(corpus.layout.image_dir),
        "wav_dir": str(corpus.layout.wav_dir) if corpus.layout.wav_dir else None,
        "images": [img.filename for img in images],
        "caption_texts": [c.text for c in captions],
        "caption_wavs": [c.wav.name if lengths[row] else None for row, c in enumerate(captions)],
    }))
    has_audio = {(c.image, c.index): bool(lengths[row]) for row, c in enumerate(captions)}
    manifest = {
        "version": CACHE_VERSION,
        "key": hashlib.sha256(f"{cache_key(cfg, vocab_size, given)}:{fingerprint}"
                              .encode()).hexdigest()[:16],
        "params": cache_params(cfg, vocab_size, given),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": {"root": str(root), "fingerprint": fingerprint},
        "counts": tally(corpus.images, corpus.captions, has_audio, set(row_of)),
        "unassigned_images": len(corpus.unassigned_images()),
        "tokenizer_vocab": tokenizer.vocab_size,
        "mel_frames": int(lengths.sum()),
        "wavs_decoded": len([c for c in captions if c.wav is not None]),
        "build_seconds": seconds,
        "workers": default_workers(workers),
        "max_mel_frames": mel_frames(10**12, cfg),
        "defects": [dataclasses.asdict(d) for d in defects],
    }
    # Written last: a folder without a manifest is never taken for a cache.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


@contextlib.contextmanager
def locked(cache_dir: Path) -> Iterator[None]:
    """Serialise prepares of one cache across processes (the second then finds it fresh)."""
    with open(cache_dir.with_name(cache_dir.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install(tmp: Path, cache_dir: Path) -> None:
    if cache_dir.exists():
        old = cache_dir.with_name(f"{cache_dir.name}.old-{os.getpid()}")
        os.rename(cache_dir, old)
        os.rename(tmp, cache_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, cache_dir)


def prepare(root: Path, cfg: DataConfig, vocab_size: int, cache_dir: Path | None = None,
            workers: int | None = None, progress: bool = True, force: bool = False,
            encoders: EncodersConfig | None = None,
            device: torch.device | str | None = None,
            tokenizer: TextTokenizer | None = None) -> PreparedCache:
    """Build (or reuse, when fresh) the feature cache of the corpus at `root`.

    With `encoders`, the feature sets its backbones need are built too (on `device`; default:
    the GPU when there is one) and attached to the returned cache. With `tokenizer` (a trained
    model's), the captions are encoded with it instead of a tokenizer trained on this corpus's
    captions, so a model can be scored on a corpus it was not trained on; the corpus's own cache
    is reused when it was built with that very tokenizer (the model's training corpus).
    """
    root = Path(root).resolve()
    if tokenizer is not None and not cache_dir and not force:
        own = default_cache_dir(root, cfg, vocab_size)
        if (is_fresh(root, cfg, vocab_size, own)
                and tokenizer_id(TextTokenizer.load(own / TOKENIZER)) == tokenizer_id(tokenizer)):
            return _with_features(PreparedCache.open(own, verify_sources=False), encoders,
                                  device, progress, workers)
    cache_dir = (Path(cache_dir).resolve() if cache_dir
                 else default_cache_dir(root, cfg, vocab_size, tokenizer))
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    params = cache_params(cfg, vocab_size, tokenizer)
    with locked(cache_dir):
        fingerprint = source_fingerprint(root)
        fresh = not force and _manifest_matches(cache_dir, params, root, fingerprint)
        if not fresh:
            # Under the lock, any sibling build folder is debris from a crashed prepare.
            for debris in cache_dir.parent.glob(f"{cache_dir.name}.tmp-*"):
                shutil.rmtree(debris, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{cache_dir.name}.tmp-", dir=cache_dir.parent))
            try:
                _build(root, cfg, vocab_size, fingerprint, tmp, workers, progress, tokenizer)
                _install(tmp, cache_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return _with_features(PreparedCache.open(cache_dir, verify_sources=False), encoders, device,
                          progress, workers)


def _with_features(cache: PreparedCache, encoders: EncodersConfig | None,
                   device: torch.device | str | None, progress: bool,
                   workers: int | None) -> PreparedCache:
    if encoders is None:
        return cache
    from nlmm.data.backbone_features import ensure_features

    return ensure_features(cache, encoders, device=device, progress=progress, workers=workers)


# --------------------------------------------------------------------------- reading

class PreparedCache:
    """Read side of a prepared cache: memory-mapped arrays plus per-split row indices."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.version: int = manifest["version"]
        self.key: str = manifest["key"]
        params = manifest["params"]
        self.vocab_size_limit: int = params["vocab_size"]
        self.data_cfg = DataConfig(**{f: params[f] for f in FEATURE_FIELDS})
        self.tokenizer = TextTokenizer.load(path / TOKENIZER)
        self.images: np.ndarray = np.load(path / IMAGES, mmap_mode="r")
        self.mels: np.ndarray = np.load(path / MELS, mmap_mode="r")
        self.tokens: np.ndarray = np.load(path / TOKENS, mmap_mode="r")
        with np.load(path / INDEX) as index:
            self.image_split_codes: np.ndarray = index["image_split"]
            self.caption_image_rows: np.ndarray = index["caption_image"]
            self.caption_indices: np.ndarray = index["caption_index"]
            self.mel_offsets: np.ndarray = index["mel_offsets"]
            self.mel_lengths: np.ndarray = index["mel_lengths"]
            self.token_lengths: np.ndarray = index["token_lengths"]
        items = json.loads((path / ITEMS).read_text())
        self.image_dir = Path(items["image_dir"])
        self.wav_dir = Path(items["wav_dir"]) if items["wav_dir"] else None
        self.image_files: list[str] = items["images"]
        self.caption_texts: list[str] = items["caption_texts"]
        self.caption_wavs: list[str | None] = items["caption_wavs"]
        caption_split = self.image_split_codes[self.caption_image_rows]
        self._split_images = {s: np.flatnonzero(self.image_split_codes == i)
                              for i, s in enumerate(SPLITS)}
        self._split_captions = {s: np.flatnonzero(caption_split == i) for i, s in enumerate(SPLITS)}
        # Backbone feature sets served instead of pixels / log-mels, by modality.
        self.features: dict[str, FeatureSet] = {}

    def with_features(self, features: dict[str, FeatureSet]) -> PreparedCache:
        """This cache serving `features` (by modality) instead of pixels / log-mels."""
        view = copy.copy(self)
        view.features = dict(features)
        return view

    @staticmethod
    def open(path: Path, verify_sources: bool = True) -> PreparedCache:
        """Open a cache; NlmmError when it is missing, of another version, or stale.

        With `verify_sources`, the corpus it was built from is fingerprinted again and must be
        unchanged (and present), so a stale cache is never used silently.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise NlmmError(f"no prepared data cache at {path}; run `nlmm data prepare` first.")
        if manifest.get("version") != CACHE_VERSION:
            raise NlmmError(f"the data cache at {path} has format version {manifest.get('version')}"
                            f" but this nlmm reads version {CACHE_VERSION}; {PREPARE_HINT}.")
        missing = [f for f in ARRAY_FILES if not (path / f).is_file()]
        if missing:
            raise NlmmError(f"the data cache at {path} lacks {', '.join(missing)}; {PREPARE_HINT}.")
        if verify_sources:
            root = Path(manifest["sources"]["root"])
            try:
                current = source_fingerprint(root)
            except NlmmError:
                raise NlmmError(f"the corpus {root} that the data cache at {path} was built from "
                                f"is gone or incomplete, so the cache cannot be checked; restore "
                                f"it and run `nlmm data prepare`.") from None
            if current != manifest["sources"]["fingerprint"]:
                raise NlmmError(f"the data cache at {path} is stale: files under {root} changed "
                                f"since it was built; {PREPARE_HINT}.")
        return PreparedCache(path, manifest)

    # ----------------------------------------------------------------- sizes and splits

    @property
    def n_images(self) -> int:
        return len(self.image_files)

    @property
    def n_captions(self) -> int:
        return len(self.caption_texts)

    @property
    def max_mel_frames(self) -> int:
        return int(self.manifest["max_mel_frames"])

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def split_images(self, split: str) -> np.ndarray:
        """Image rows of a split, ascending."""
        self._check_split(split)
        return self._split_images[split]

    def split_captions(self, split: str) -> np.ndarray:
        """Caption rows of a split, ascending (captions without audio included)."""
        self._check_split(split)
        return self._split_captions[split]

    def split_audio_captions(self, split: str) -> np.ndarray:
        """Caption rows of a split that have a spoken caption."""
        rows = self.split_captions(split)
        return rows[self.mel_lengths[rows] > 0]

    # ----------------------------------------------------------------- per-row lookups

    def caption_image(self, rows: np.ndarray | int) -> np.ndarray:
        return self.caption_image_rows[rows].astype(np.int64)

    def caption_has_audio(self, rows: np.ndarray | int) -> np.ndarray:
        return self.mel_lengths[rows] > 0

    def caption_text(self, row: int) -> str:
        return self.caption_texts[row]

    def caption_wav(self, row: int) -> str | None:
        return self.caption_wavs[row]

    def image_file(self, row: int) -> str:
        return self.image_files[row]

    def image_path(self, row: int) -> Path:
        return self.image_dir / self.image_files[row]

    def wav_path(self, row: int) -> Path | None:
        name = self.caption_wavs[row]
        return self.wav_dir / name if name and self.wav_dir else None

    def mel(self, row: int) -> np.ndarray:
        """Log-mel (n_mels, T) float16 of a caption's spoken version (a view of the memmap)."""
        n = int(self.mel_lengths[row])
        if n == 0:
            raise ValueError(f"caption row {row} has no audio")
        off = int(self.mel_offsets[row])
        return self.mels[off:off + n].T

    def report(self) -> CheckReport:
        """The counts and defects recorded when the cache was built."""
        return CheckReport(Path(self.manifest["sources"]["root"]), self.manifest["counts"],
                           [Defect(**d) for d in self.manifest["defects"]],
                           self.manifest["unassigned_images"], True)
