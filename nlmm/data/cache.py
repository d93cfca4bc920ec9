"""Prepare once, train fast: a versioned, memory-mappable feature cache of one or more corpora.

Rows follow the corpus interface (nlmm.data.corpora): a row per group (an image or a clip; the
images array has one row per group, left as a sparse hole where a group has no image) and a row
per caption, each pointing to its group. A caption's audio is its own reading (FACC) or its
group's clip (AudioCaps, Clotho, LibriSpeech): a clip is stored once and every caption of the
group points at the same frames; `audio_primary` marks the one caption row that stands for an
audio item in galleries, so a clip is ranked once, not once per caption.

`prepare` decodes every image and every audio file once, trains the tokenizer on training captions,
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
from nlmm.data.features import BadInput, load_image, load_log_mel
from nlmm.data.check import CheckReport, caption_audio, tally
from nlmm.data.corpora import read_corpus, resolve_spec
from nlmm.data.corpora.base import SPLITS, Caption, Corpus, CorpusSpec, Defect, Group
from nlmm.data.parallel import default_workers, map_chunks
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from nlmm.data.backbone_features import FeatureSet

CACHE_VERSION = 2
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


Specs = CorpusSpec | Path | str | list[CorpusSpec | Path | str]


def as_specs(data: Specs) -> list[CorpusSpec]:
    """One or several corpora as resolved specs (format detected where none is named), paths
    absolute."""
    items = data if isinstance(data, list) else [data]
    specs = []
    for item in items:
        spec = item if isinstance(item, CorpusSpec) else CorpusSpec(Path(item))
        spec = CorpusSpec(Path(spec.path).resolve(), spec.format, spec.columns)
        specs.append(resolve_spec(spec))
    if not specs:
        raise NlmmError("no corpus given; pass --data PATH.")
    return specs


def cache_params(cfg: DataConfig, vocab_size: int, tokenizer: TextTokenizer | None = None,
                 specs: list[CorpusSpec] | None = None) -> dict[str, Any]:
    """The parameters that change the cached features (augmentation does not); with a given
    tokenizer (a trained model's, for another corpus) its identity too; with `specs` how the
    corpora are read (format, manifest columns)."""
    params = {**{f: getattr(cfg, f) for f in FEATURE_FIELDS}, "vocab_size": vocab_size}
    if tokenizer is not None:
        params["tokenizer"] = tokenizer_id(tokenizer)
    if specs is not None:
        params["corpora"] = [s.to_dict() for s in specs]
    return params


def cache_key(cfg: DataConfig, vocab_size: int, tokenizer: TextTokenizer | None = None,
              specs: list[CorpusSpec] | None = None) -> str:
    blob = json.dumps({"version": CACHE_VERSION,
                       **cache_params(cfg, vocab_size, tokenizer, specs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cache_home(spec: CorpusSpec) -> Path:
    path = Path(spec.path)
    return path if path.is_dir() else path.parent


def default_cache_dir(data: Specs, cfg: DataConfig, vocab_size: int,
                      tokenizer: TextTokenizer | None = None) -> Path:
    """`<first corpus>/.nlmm_cache/<key>` (`mix-<key>` for several corpora)."""
    specs = as_specs(data)
    key = cache_key(cfg, vocab_size, tokenizer, specs)
    return _cache_home(specs[0]) / CACHE_DIR_NAME / (key if len(specs) == 1 else f"mix-{key}")


def corpus_fingerprint(corpus: Corpus) -> str:
    """Hash of the annotation files' bytes and (path, size, mtime_ns) of every media file.

    Stat-only for the media files keeps this well under a second for a Flickr8k-sized corpus,
    so it can run on every start; any edit, copy or touch of a file changes it.
    """
    digest = hashlib.sha256(corpus.format.encode() + b"\0")
    for path in corpus.sources:
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted({str(p) for p in corpus.media_paths()}):
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_fingerprint(data: Specs, corpora: list[Corpus] | None = None) -> str:
    """Fingerprint of every corpus in `data` (re-read: the files decide, not a stored listing),
    or of `corpora` when the caller has just read them."""
    if corpora is None:
        corpora = [read_corpus(s) for s in as_specs(data)]
    return hashlib.sha256("".join(corpus_fingerprint(c) for c in corpora).encode()).hexdigest()


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _sources_entry(specs: list[CorpusSpec], fingerprint: str) -> dict[str, Any]:
    return {"root": str(specs[0].path), "corpora": [s.to_dict() for s in specs],
            "fingerprint": fingerprint}


def _manifest_matches(cache_dir: Path, params: dict[str, Any], specs: list[CorpusSpec],
                      fingerprint: str) -> bool:
    manifest = _read_manifest(cache_dir)
    # The paths must match too: a cache copied along with its corpus still names the old ones.
    return (manifest is not None and manifest.get("version") == CACHE_VERSION
            and manifest.get("params") == params
            and manifest.get("sources") == _sources_entry(specs, fingerprint)
            and all((cache_dir / f).is_file() for f in ARRAY_FILES))


def is_fresh(data: Specs, cfg: DataConfig, vocab_size: int, cache_dir: Path | None = None) -> bool:
    """True when a cache for these parameters exists and its sources are unchanged."""
    specs = as_specs(data)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(specs, cfg, vocab_size)
    return _manifest_matches(cache_dir, cache_params(cfg, vocab_size, specs=specs), specs,
                             source_fingerprint(specs))


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


def _decode_images(groups: list[Group], size: int, out: Path, workers: int | None,
                   bar: Progress, defects: list[Defect]) -> np.ndarray:
    """Fill row i of `out` with group i's image (groups without one stay a sparse hole);
    returns whether each group's image decoded."""
    _allocate_npy(out, (len(groups), 3, size, size), np.uint8)
    items = [(i, g.image) for i, g in enumerate(groups) if g.image is not None]
    task = bar.add_task("images", total=len(items))
    ok = np.zeros(len(groups), dtype=bool)
    for chunk in map_chunks(decode_images_chunk, items, args=(size, str(out)), workers=workers,
                            progress=bar, task=task):
        for row, reason in chunk:
            if reason is None:
                ok[row] = True
            else:
                g = groups[row]
                what = ("image skipped; the clip and captions kept" if g.audio is not None
                        else "image and its captions skipped")
                defects.append(Defect("bad_image", g.image.name, f"{reason}; {what}"))
    return ok


def _compact_images(out: Path, kept: np.ndarray, size: int) -> None:
    """Keep only rows `kept` (ascending) of images.npy, in place."""
    arr = np.load(out, mmap_mode="r+")
    if len(kept) == arr.shape[0]:
        return
    for new, old in enumerate(kept):
        if new != old:
            arr[new] = arr[old]
    arr.flush()
    del arr
    _shrink_npy(out, (len(kept), 3, size, size), np.uint8)


def _compute_mels(paths: list[Path], cfg: DataConfig, out: Path, workers: int | None,
                  bar: Progress) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Stream every audio file's log-mel into one flat (frames, n_mels) array: offsets and
    lengths per file (length 0: it failed), and the reason per failed file."""
    offsets = np.zeros(len(paths), dtype=np.int64)
    lengths = np.zeros(len(paths), dtype=np.int32)
    failed: dict[int, str] = {}
    task = bar.add_task("audio", total=len(paths))
    total = 0
    with open(out, "wb") as fh:
        fh.write(npy_header((0, cfg.n_mels), np.float16))
        for chunk in map_chunks(log_mel_chunk, list(enumerate(paths)), args=(cfg,),
                                workers=workers, progress=bar, task=task):
            for i, mel, reason in chunk:
                if mel is None:
                    failed[i] = reason
                    continue
                fh.write(mel.tobytes())
                offsets[i], lengths[i] = total, mel.shape[0]
                total += mel.shape[0]
        fh.seek(0)
        fh.write(npy_header((total, cfg.n_mels), np.float16))
    return offsets, lengths, failed


def _merge_sources(corpora: list[Corpus]) -> tuple[list[Group], list[Caption], list[int],
                                                   list[Defect]]:
    """Every corpus's groups and captions in one list; group ids carry a source prefix when
    there are several corpora, so ids of different corpora never meet."""
    groups: list[Group] = []
    captions: list[Caption] = []
    source_of: list[int] = []
    defects: list[Defect] = []
    for i, corpus in enumerate(corpora):
        prefix = f"{i}:" if len(corpora) > 1 else ""
        for g in corpus.groups:
            groups.append(Group(prefix + g.id, g.split, g.image, g.audio))
            source_of.append(i)
        captions.extend(Caption(prefix + c.group, c.index, c.text, c.audio)
                        for c in corpus.captions)
        defects.extend(corpus.defects)
    return groups, captions, source_of, defects


def _build(specs: list[CorpusSpec], corpora: list[Corpus], cfg: DataConfig, vocab_size: int,
           fingerprint: str, out: Path, workers: int | None, progress: bool,
           given: TextTokenizer | None = None) -> None:
    groups_all, captions_all, source_all, defects = _merge_sources(corpora)
    where = ", ".join(str(s.path) for s in specs)
    order = {s: i for i, s in enumerate(SPLITS)}
    source_of = {g.id: src for g, src in zip(groups_all, source_all, strict=True)}
    captioned = {c.group for c in captions_all}
    candidates = sorted((g for g in groups_all if g.split is not None and g.id in captioned),
                        key=lambda g: (order[g.split], source_of[g.id], g.id))
    if not candidates:
        raise NlmmError(f"no captioned image or clip of {where} is in a split, so nothing can be "
                        f"prepared; run `nlmm data check {specs[0].path}` to see why.")
    seconds: dict[str, float] = {}
    with progress_bar(progress) as bar:
        start = time.perf_counter()
        image_ok = _decode_images(candidates, cfg.image_size, out / IMAGES, workers, bar, defects)
        seconds["images"] = time.perf_counter() - start
        by_id = {g.id: g for g in candidates}
        cand_captions = [c for c in captions_all if c.group in by_id]
        # every distinct audio file once: a clip is shared by all captions of its group
        audio_paths = sorted({str(p) for c in cand_captions
                              if (p := caption_audio(c, by_id[c.group])) is not None})
        start = time.perf_counter()
        offsets, lengths, failed = _compute_mels([Path(p) for p in audio_paths], cfg,
                                                 out / MELS, workers, bar)
        seconds["audio"] = time.perf_counter() - start
        audio_index = {p: i for i, p in enumerate(audio_paths)}
        for i, reason in failed.items():
            path = Path(audio_paths[i])
            clip = any(g.audio == path for g in candidates)
            defects.append(Defect("bad_audio", path.name, f"{reason}; "
                                  + ("clip skipped" if clip else "caption kept without audio")))

        def audio_of(c: Caption) -> int | None:
            p = caption_audio(c, by_id[c.group])
            i = None if p is None else audio_index[str(p)]
            return i if i is not None and lengths[i] > 0 else None

        with_audio = {c.group for c in cand_captions if audio_of(c) is not None}
        # a group whose image fails is dropped with its captions, unless it is a clip's group
        keep_group = np.array([bool(image_ok[r]) or g.id in with_audio
                               and (g.image is None or g.audio is not None)
                               for r, g in enumerate(candidates)], dtype=bool)
        kept = np.flatnonzero(keep_group)
        _compact_images(out / IMAGES, kept, cfg.image_size)
        groups = [candidates[i] for i in kept]
        has_image = image_ok[kept]
        row_of = {g.id: row for row, g in enumerate(groups)}
        captions = sorted((c for c in cand_captions if c.group in row_of),
                          key=lambda c: (row_of[c.group], c.index))
        split_of = {g.id: g.split for g in groups}
        train_texts = [c.text for c in captions if split_of[c.group] == "train"]
        if not train_texts:
            raise NlmmError(f"the train split of {where} has no usable image-caption or "
                            f"caption-audio pair; run `nlmm data check {specs[0].path}` to see "
                            f"the defects.")
        caption_audio_item = [audio_of(c) for c in captions]
        start = time.perf_counter()
        task = bar.add_task("tokens", total=len(captions))
        tokenizer = given or TextTokenizer.train(train_texts, vocab_size)
        tokens, token_lengths = tokenizer.encode_batch([c.text for c in captions], cfg.text_max_len)
        bar.advance(task, len(captions))
        seconds["tokens"] = time.perf_counter() - start
    items = np.array([-1 if i is None else i for i in caption_audio_item], dtype=np.int64)
    has = items >= 0
    offsets, lengths = np.append(offsets, 0), np.append(lengths, 0)  # index -1: no audio
    primary = np.zeros(len(captions), dtype=bool)
    first_rows = np.unique(items[has], return_index=True)[1]
    primary[np.flatnonzero(has)[first_rows]] = True
    own = np.array([c.audio is not None for c in captions], dtype=bool) & has
    tokenizer.save(out / TOKENIZER)
    np.save(out / TOKENS, tokens)
    np.savez(out / INDEX,
             image_split=np.array([order[g.split] for g in groups], dtype=np.int8),
             group_has_image=has_image,
             group_source=np.array([source_of[g.id] for g in groups], dtype=np.int16),
             caption_image=np.array([row_of[c.group] for c in captions], dtype=np.int32),
             caption_index=np.array([c.index for c in captions], dtype=np.int32),
             mel_offsets=offsets[items], mel_lengths=lengths[items].astype(np.int32),
             audio_primary=primary, own_audio=own, token_lengths=token_lengths)
    (out / ITEMS).write_text(json.dumps({
        "groups": [g.id for g in groups],
        "image_paths": [str(g.image) if ok else None
                        for g, ok in zip(groups, has_image, strict=True)],
        "caption_texts": [c.text for c in captions],
        "caption_audio": [audio_paths[i] if i is not None else None for i in caption_audio_item],
        "sources": [{**s.to_dict(), "format": c.format, "notes": c.notes}
                    for s, c in zip(specs, corpora, strict=True)],
    }))
    has_audio = {(c.group, c.index): i is not None
                 for c, i in zip(captions, caption_audio_item, strict=True)}
    clip_ok = {g.id for g in groups if g.audio is not None
               and lengths[audio_index[str(g.audio)]] > 0}
    image_ok_ids = {g.id for g, ok in zip(groups, has_image, strict=True) if ok}
    manifest = {
        "version": CACHE_VERSION,
        "key": hashlib.sha256(f"{cache_key(cfg, vocab_size, given, specs)}:{fingerprint}"
                              .encode()).hexdigest()[:16],
        "params": cache_params(cfg, vocab_size, given, specs),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": _sources_entry(specs, fingerprint),
        "formats": [c.format for c in corpora],
        "counts": tally(groups_all, captions_all, has_audio, image_ok_ids, clip_ok),
        "source_counts": [tally([g for g in groups_all if source_of[g.id] == i],
                                [c for c in captions_all if source_of.get(c.group) == i],
                                has_audio, image_ok_ids, clip_ok) for i in range(len(specs))],
        "unassigned_images": sum(1 for g in groups_all if g.split is None),
        "tokenizer_vocab": tokenizer.vocab_size,
        "mel_frames": int(lengths.sum()),
        "wavs_decoded": len(audio_paths),
        "build_seconds": seconds,
        "workers": default_workers(workers),
        "max_mel_frames": cfg.mel_frames(10**12),
        "defects": [dataclasses.asdict(d) for d in defects],
        "notes": [n for c in corpora for n in c.notes],
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


def prepare(data: Specs, cfg: DataConfig, vocab_size: int, cache_dir: Path | None = None,
            workers: int | None = None, progress: bool = True, force: bool = False,
            encoders: EncodersConfig | None = None,
            device: torch.device | str | None = None,
            tokenizer: TextTokenizer | None = None) -> PreparedCache:
    """Build (or reuse, when fresh) the feature cache of the corpus (or corpora) in `data`: a
    folder or manifest path, a CorpusSpec, or a list of them (one cache, a tokenizer trained on
    the union of their training captions).

    With `encoders`, the feature sets its backbones need are built too (on `device`; default:
    the GPU when there is one) and attached to the returned cache. With `tokenizer` (a trained
    model's), the captions are encoded with it instead of a tokenizer trained on this corpus's
    captions, so a model can be scored on a corpus it was not trained on; the corpus's own cache
    is reused when it was built with that very tokenizer (the model's training corpus).
    """
    specs = as_specs(data)
    if tokenizer is not None and not cache_dir and not force:
        own = default_cache_dir(specs, cfg, vocab_size)
        if (is_fresh(specs, cfg, vocab_size, own)
                and tokenizer_id(TextTokenizer.load(own / TOKENIZER)) == tokenizer_id(tokenizer)):
            return _with_features(PreparedCache.open(own, verify_sources=False), encoders,
                                  device, progress, workers)
    cache_dir = (Path(cache_dir).resolve() if cache_dir
                 else default_cache_dir(specs, cfg, vocab_size, tokenizer))
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    params = cache_params(cfg, vocab_size, tokenizer, specs)
    with locked(cache_dir):
        # read once: the same listing is fingerprinted and, when stale, built
        corpora = [read_corpus(spec) for spec in specs]
        fingerprint = source_fingerprint(specs, corpora)
        fresh = not force and _manifest_matches(cache_dir, params, specs, fingerprint)
        if not fresh:
            # Under the lock, any sibling build folder is debris from a crashed prepare.
            for debris in cache_dir.parent.glob(f"{cache_dir.name}.tmp-*"):
                shutil.rmtree(debris, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{cache_dir.name}.tmp-", dir=cache_dir.parent))
            try:
                _build(specs, corpora, cfg, vocab_size, fingerprint, tmp, workers, progress,
                       tokenizer)
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
    """Read side of a prepared cache: memory-mapped arrays plus per-split row indices.

    "Image rows" are group rows (an image or a clip): `image_file(row)` is the group's id
    (for Flickr8k its file name) and `image_path(row)` its image, or None for a clip.
    """

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
            self.group_has_image: np.ndarray = index["group_has_image"]
            self.group_source: np.ndarray = index["group_source"]
            self.caption_image_rows: np.ndarray = index["caption_image"]
            self.caption_indices: np.ndarray = index["caption_index"]
            self.mel_offsets: np.ndarray = index["mel_offsets"]
            self.mel_lengths: np.ndarray = index["mel_lengths"]
            self.audio_primary: np.ndarray = index["audio_primary"]
            self.own_audio: np.ndarray = index["own_audio"]
            self.token_lengths: np.ndarray = index["token_lengths"]
        items = json.loads((path / ITEMS).read_text())
        self.image_files: list[str] = items["groups"]
        self.image_paths: list[str | None] = items["image_paths"]
        self.caption_texts: list[str] = items["caption_texts"]
        self.caption_audio: list[str | None] = items["caption_audio"]
        self.sources: list[dict[str, Any]] = items["sources"]
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

        With `verify_sources`, the corpora it was built from are fingerprinted again and must
        be unchanged (and present), so a stale cache is never used silently.
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
            sources = manifest["sources"]
            specs = [CorpusSpec.from_dict(d) for d in sources["corpora"]]
            try:
                current = source_fingerprint(specs)
            except (NlmmError, OSError):
                raise NlmmError(f"the corpus {sources['root']} that the data cache at {path} was "
                                f"built from is gone or incomplete, so the cache cannot be "
                                f"checked; restore it and run `nlmm data prepare`.") from None
            if current != sources["fingerprint"]:
                raise NlmmError(f"the data cache at {path} is stale: files under "
                                f"{sources['root']} changed since it was built; {PREPARE_HINT}.")
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

    def modalities(self) -> tuple[str, ...]:
        """The modalities that some caption row can pair with text: image and/or audio."""
        present = {"text"}
        if bool(self.group_has_image[self.caption_image_rows].any()):
            present.add("image")
        if bool((self.mel_lengths > 0).any()):
            present.add("audio")
        return tuple(m for m in ("image", "text", "audio") if m in present)

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def _of_source(self, rows: np.ndarray, groups: np.ndarray, source: int | None) -> np.ndarray:
        return rows if source is None else rows[self.group_source[groups] == source]

    def split_groups(self, split: str, source: int | None = None) -> np.ndarray:
        """Group rows of a split (images and clips alike), ascending."""
        self._check_split(split)
        rows = self._split_images[split]
        return self._of_source(rows, rows, source)

    def split_images(self, split: str, source: int | None = None) -> np.ndarray:
        """Rows of a split's groups that have an image, ascending."""
        rows = self.split_groups(split, source)
        return rows[self.group_has_image[rows]]

    def split_captions(self, split: str, source: int | None = None) -> np.ndarray:
        """Caption rows of a split, ascending (captions without audio included)."""
        self._check_split(split)
        rows = self._split_captions[split]
        return self._of_source(rows, self.caption_image_rows[rows], source)

    def split_audio_captions(self, split: str, source: int | None = None) -> np.ndarray:
        """Caption rows of a split that stand for an audio item (a spoken caption, or the one
        row per clip), so each recording is in a gallery once."""
        rows = self.split_captions(split, source)
        return rows[(self.mel_lengths[rows] > 0) & self.audio_primary[rows]]

    # ----------------------------------------------------------------- per-row lookups

    def caption_image(self, rows: np.ndarray | int) -> np.ndarray:
        return self.caption_image_rows[rows].astype(np.int64)

    def caption_has_audio(self, rows: np.ndarray | int) -> np.ndarray:
        return self.mel_lengths[rows] > 0

    def caption_has_image(self, rows: np.ndarray | int) -> np.ndarray:
        return self.group_has_image[self.caption_image_rows[rows]]

    def caption_text(self, row: int) -> str:
        return self.caption_texts[row]

    def caption_wav(self, row: int) -> str | None:
        path = self.caption_audio[row]
        return Path(path).name if path else None

    def image_file(self, row: int) -> str:
        return self.image_files[row]

    def image_path(self, row: int) -> Path | None:
        path = self.image_paths[row]
        return Path(path) if path else None

    def wav_path(self, row: int) -> Path | None:
        path = self.caption_audio[row]
        return Path(path) if path else None

    def mel(self, row: int) -> np.ndarray:
        """Log-mel (n_mels, T) float16 of a caption's audio (a view of the memmap)."""
        n = int(self.mel_lengths[row])
        if n == 0:
            raise ValueError(f"caption row {row} has no audio")
        off = int(self.mel_offsets[row])
        return self.mels[off:off + n].T

    def report(self) -> CheckReport:
        """The counts and defects recorded when the cache was built."""
        formats = self.manifest.get("formats", ["flickr8k"])
        return CheckReport(Path(self.manifest["sources"]["root"]), self.manifest["counts"],
                           [Defect(**d) for d in self.manifest["defects"]],
                           self.manifest["unassigned_images"], True, "+".join(formats),
                           self.manifest.get("notes", []))
