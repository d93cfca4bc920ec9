"""`nlmm data pack`: a corpus's groups written once into litdata shards, read by nlmm.data.stream.

One sample per group (an image or a clip with all its captions), holding what the model reads:
the image as the (image_size, image_size) crop the prepared cache stores, encoded (JPEG for
JPEG sources, PNG otherwise), and every recording as its float16 log-mel. Decoding at training
time is then one small image per sample, and the log-mel of a clip is computed once, not once
per epoch; the settings they were made with are recorded in nlmm_pack.json and a run with other
settings is refused (check_features). Layout of `out` (a folder or s3://bucket/prefix):

    nlmm_pack.json          counts, defects, features, every shard's sha256 and offsets
    tokenizer.json          BPE trained on the train split's captions only
    train/ dev/ test/       litdata folders: index.json + chunk-NNNNN.bin
    .pack/                  progress: the plan's fingerprint and one marker per finished block

Every split is cut into blocks of groups (~chunk_bytes of media each, in an order fixed by a
hash of the group ids, so a chunk is a random sample of the corpus). Blocks are packed in
parallel on every core, each in one pass: decode every file (what `nlmm data check` does), bake
the kept groups' features, write the block's shard, then its marker. Group and caption indices
in a shard count from 0; nlmm_pack.json holds each shard's offsets into the pack's dense
indices. So a shard depends on its block alone, and a pack killed at any point resumes at the
first block without a marker and writes the same bytes as an uninterrupted one.

Why not `litdata.optimize(use_checkpoint=True)`: it resumes exactly only while every input
yields a sample; with skipped (defective) inputs its checkpoint counts samples, not inputs,
and the resumed pack duplicates samples (bench/STREAM_NOTES.md has the measurement).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

from nlmm.config import DataConfig
from nlmm.data.check import tally
from nlmm.data.corpora.base import SPLITS, Caption, Corpus, Defect, Group
from nlmm.data.features import BadInput, load_image, load_wav, log_mel
from nlmm.data.parallel import default_workers
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

PACK_FORMAT = "nlmm-pack"
PACK_VERSION = 2  # 2: images and log-mels made at pack time, shard-relative indices
MANIFEST = "nlmm_pack.json"
TOKENIZER = "tokenizer.json"
STATE = ".pack"
PLAN = f"{STATE}/plan.json"
MAX_BLOCK_GROUPS = 4096  # keeps a block's verify job short even for tiny samples
INDEX = "index.json"


# --------------------------------------------------------------------------- where a pack lives

def _is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


class Store(abc.ABC):
    """A pack's home, a local folder or an s3:// prefix, seen as a flat set of named files."""

    url: str

    @abc.abstractmethod
    def read(self, name: str) -> bytes | None:
        ...

    @abc.abstractmethod
    def write(self, name: str, data: bytes) -> None:
        ...

    @abc.abstractmethod
    def put_file(self, local: Path, name: str) -> None:
        """Move a finished local file into the store under `name` (the local copy goes away)."""
        ...

    @abc.abstractmethod
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every file whose name starts with `prefix`."""
        ...

    @abc.abstractmethod
    def delete(self, names: list[str]) -> None:
        ...

    def local_path(self, name: str) -> Path | None:
        """The file's path when the store is a local folder (hashing reads it in place)."""
        return None

    @abc.abstractmethod
    def staging(self) -> Path:
        """A local folder for files on their way into the store, on the same disk when local."""

    def join(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def read_json(self, name: str) -> Any | None:
        data = self.read(name)
        return None if data is None else json.loads(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write(name, json.dumps(obj, indent=1, sort_keys=True).encode())


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = str(self.root)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers and a resumed pack never see half a file

    def put_file(self, local: Path, name: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, path)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        out = {}
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out[rel] = os.path.getsize(os.path.join(dirpath, f))
        return out

    def delete(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()

    def clear(self) -> None:
        for child in self.root.iterdir() if self.root.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def local_path(self, name: str) -> Path | None:
        return self.root / name

    def staging(self) -> Path:
        path = self.root / STATE / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path


def s3_client(storage_options: dict[str, Any] | None = None) -> Any:
    """A boto3 S3 client: endpoint and credentials from `storage_options` (the keyword arguments
    litdata passes to boto3, e.g. endpoint_url) or boto3's usual environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, ...). Few retries: a wrong endpoint is reported, not waited on."""
    import boto3
    import botocore.config

    opts = dict(storage_options or {})
    retries = {"max_attempts": 3, "mode": "standard"}
    opts.setdefault("config", botocore.config.Config(retries=retries, connect_timeout=10,
                                                     read_timeout=120))
    return boto3.client("s3", **opts)


class S3Store(Store):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        parsed = urlparse(url)
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self._client = s3_client(storage_options)
        self._staging: Path | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import botocore.exceptions as bx

        try:
            yield
        except bx.EndpointConnectionError as exc:
            raise NlmmError(f"cannot reach the object store for {self.url} ({exc}); check "
                            "AWS_ENDPOINT_URL or storage_options['endpoint_url'].") from None
        except bx.NoCredentialsError:
            raise NlmmError(f"no credentials for {self.url}; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or a profile).") from None
        except bx.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise
            raise NlmmError(f"the object store refused access to {self.url} ({code or exc}); "
                            f"check that bucket {self.bucket!r} exists and the credentials "
                            "may use it.") from None

    def read(self, name: str) -> bytes | None:
        import botocore.exceptions as bx

        try:
            with self._errors():
                obj = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
                return obj["Body"].read()
        except bx.ClientError:
            return None

    def write(self, name: str, data: bytes) -> None:
        with self._errors():
            self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def put_file(self, local: Path, name: str) -> None:
        with self._errors():
            self._client.upload_file(str(local), self.bucket, self._key(name))
        local.unlink()

    def get_file(self, name: str, local: Path) -> None:
        """Download `name` into the local file (streamed, never whole in memory)."""
        with self._errors():
            self._client.download_file(self.bucket, self._key(name), str(local))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        out = {}
        base = f"{self.prefix}/" if self.prefix else ""
        with self._errors():
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(base):]] = obj["Size"]
        return out

    def delete(self, names: list[str]) -> None:
        with self._errors():
            for i in range(0, len(names), 1000):
                batch = [{"Key": self._key(n)} for n in names[i:i + 1000]]
                if batch:
                    self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def clear(self) -> None:
        self.delete(list(self.sizes()))

    def staging(self) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="nlmm_pack_"))
        return self._staging


def open_store(url: str | Path, storage_options: dict[str, Any] | None = None) -> Store:
    return S3Store(str(url), storage_options) if _is_s3(str(url)) else LocalStore(Path(url))


def store_error_context(store: Store) -> contextlib.AbstractContextManager:
    return store._errors() if isinstance(store, S3Store) else contextlib.nullcontext()


# --------------------------------------------------------------------------- the plan

@dataclass
class Item:
    """One group as it is packed: its media paths and its captions in caption order."""

    gid: str
    split: str
    image: str | None
    clip: str | None
    captions: list[str]
    readings: list[str | None]  # each caption's own spoken reading


@dataclass
class Block:
    split: str
    number: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}"

    @property
    def shard(self) -> str:
        return f"{self.split}/chunk-{self.number:05d}.bin"


def _stat(path: str | None) -> tuple[int, int]:
    if path is None:
        return 0, 0
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0  # reported by the verify pass with its reason


def _hash_order(gid: str) -> str:
    return hashlib.sha1(gid.encode()).hexdigest()


def plan_blocks(corpus: Corpus, chunk_bytes: int) -> tuple[list[Block], list[tuple]]:
    """The blocks of every split and what their fingerprint is made of (paths, sizes, mtimes)."""
    by_group: dict[str, list] = {}
    for c in corpus.captions:
        by_group.setdefault(c.group, []).append(c)
    blocks: list[Block] = []
    facts: list[tuple] = []
    for split in SPLITS:
        groups = sorted((g for g in corpus.groups if g.split == split and g.id in by_group),
                        key=lambda g: _hash_order(g.id))
        current: list[Item] = []
        size, number = 0, 0
        for g in groups:
            caps = sorted(by_group[g.id], key=lambda c: c.index)
            item = Item(g.id, split, str(g.image) if g.image else None,
                        str(g.audio) if g.audio else None, [c.text for c in caps],
                        [str(c.audio) if c.audio else None for c in caps])
            stats = [_stat(p) for p in (item.image, item.clip, *item.readings)]
            facts.append((g.id, split, item.image, item.clip, item.captions, item.readings, stats))
            item_bytes = sum(s for s, _ in stats) + sum(len(t) for t in item.captions)
            if current and (size + item_bytes > chunk_bytes or len(current) >= MAX_BLOCK_GROUPS):
                blocks.append(Block(split, number, current))
                current, size, number = [], 0, number + 1
            current.append(item)
            size += item_bytes
        if current:
            blocks.append(Block(split, number, current))
    return blocks, facts


def fingerprint(corpus: Corpus, vocab_size: int, chunk_bytes: int, params: dict[str, Any],
                facts: list[tuple]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([PACK_FORMAT, PACK_VERSION, corpus.format, str(corpus.root), vocab_size,
                         chunk_bytes, params], sort_keys=True).encode())
    for fact in facts:
        h.update(json.dumps(fact).encode())
    return h.hexdigest()


def parse_bytes(value: str | int) -> int:
    """'64MB' / '512KB' / '1GB' / 12345 -> bytes (decimal units, as litdata reads them)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * mult)
    if text.isdigit():
        return int(text)
    raise NlmmError(f"chunk_bytes {value!r} is not a size; write it like '64MB' or '512KB'.")


# --------------------------------------------------------------------------- baked features

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


# --------------------------------------------------------------------------- one block

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- orchestration

@dataclass
class PackReport:
    out: str
    counts: dict[str, dict[str, int]]
    defects: list[Defect]
    shards: int
    bytes: int
    blocks_done_before: int  # shards a previous run had finished (resumed, not rewritten)
    seconds: float
    modalities: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        parts = [f"{s} {c[s]['groups']} groups / {c[s]['captions']} captions" for s in SPLITS]
        return (f"packed {self.out}: {'; '.join(parts)}; {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB, {len(self.defects)} defect(s), {self.seconds:.1f} s")


def progress_bar(enabled: bool) -> Progress:
    return Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(),
                    TimeRemainingColumn(elapsed_when_finished=True), disable=not enabled)


def _pool(workers: int, jobs: list) -> Any:
    """A forked pool (torch single-threaded per worker, see nlmm.data.parallel), or None when
    one process is enough."""
    if workers <= 1 or len(jobs) <= 1:
        return None
    from nlmm.data.parallel import _init_worker

    return mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_init_worker)


def _run(fn, jobs: list, workers: int) -> Iterator[Any]:
    pool = _pool(workers, jobs)
    if pool is None:
        yield from map(fn, jobs)
        return
    with pool:
        yield from pool.imap_unordered(fn, jobs)


def _prepare_out(store: Store, fp: str, force: bool) -> int:
    """Make `out` ready: fresh, or holding an unfinished pack of this very plan (resumed).
    Returns how many block markers a previous run left."""
    existing = store.sizes()
    plan = store.read_json(PLAN) if existing else None
    if existing and (force or plan is None or plan.get("fingerprint") != fp):
        if not force:
            what = ("a pack of another corpus or with other settings" if plan is not None
                    else "files that are not a pack")
            raise NlmmError(f"{store.url} is not empty (it holds {what}); pick an empty folder or "
                            "pass force=True (--force) to replace what is there.")
        store.clear()
        existing = {}
    if not existing:
        store.write_json(PLAN, {"fingerprint": fp, "version": PACK_VERSION})
    return sum(1 for n in existing if n.startswith(f"{STATE}/write/") and n.endswith(".json"))


def _repair_list(store: Store, manifest: dict) -> list[str]:
    """Blocks of a finished pack whose shard is missing or corrupted (local: sha256; object
    store: size), so a rerun rewrites just those."""
    sizes = store.sizes()
    bad = []
    for name, meta in manifest["shards"].items():
        local = store.local_path(name)
        if sizes.get(name) != meta["bytes"] or (
                local is not None and sha256_file(local) != meta["sha256"]):
            bad.append(meta["block"])
    return bad


def pack(corpus: Corpus, out: str | Path, *, vocab_size: int, data_cfg: DataConfig | None = None,
         workers: int | None = None, force: bool = False, progress: bool = True,
         chunk_bytes: str | int = "64MB",
         storage_options: dict[str, Any] | None = None) -> PackReport:
    """Write `corpus` into litdata shards under `out` (folder or s3://bucket/prefix), its images
    and log-mels made with `data_cfg`'s settings (image_size, the mel parameters; default
    DataConfig()), which a run training from the pack must share.

    Resumes an interrupted pack of the same corpus and settings; rerun on a finished pack it
    rewrites only shards that are missing or corrupted. Any other non-empty `out` is refused
    unless `force`.
    """
    start = time.perf_counter()
    target = parse_bytes(chunk_bytes)
    params = feature_params(data_cfg or DataConfig())
    workers = default_workers(workers)
    store = open_store(out, storage_options)
    blocks, facts = plan_blocks(corpus, target)
    if not blocks:
        raise NlmmError(f"no captioned image or clip of {corpus.root} is in a split, so nothing "
                        f"can be packed; run `nlmm data check {corpus.root}` to see why.")
    fp = fingerprint(corpus, vocab_size, target, params, facts)
    with store_error_context(store):
        done_before = _prepare_out(store, fp, force)
        finished = store.read_json(MANIFEST)
        if finished is not None and finished.get("fingerprint") == fp:
            for name in _repair_list(store, finished):
                store.delete([f"{STATE}/write/{name}.json"])
        with progress_bar(progress) as bar:
            markers = _pack_blocks(store, blocks, params, workers, bar)
        verdicts, defects = _verdicts(blocks, markers)
        tokenizer = _tokenizer(store, blocks, verdicts, vocab_size)
        manifest = _manifest(corpus, blocks, verdicts, defects, markers, fp, vocab_size, target,
                             tokenizer, params)
        for split in SPLITS:
            _write_index(store, split, blocks, markers, fp, target)
        store.write_json(MANIFEST, manifest)  # last: a pack without it is unfinished
    if isinstance(store, LocalStore):
        shutil.rmtree(store.root / STATE / "tmp", ignore_errors=True)
    # the reader's defects (files listed but missing, malformed lines) come first, as in check
    return PackReport(store.url, manifest["counts"], list(corpus.defects) + defects,
                      len(manifest["shards"]),
                      sum(m["bytes"] for m in manifest["shards"].values()), done_before,
                      time.perf_counter() - start, manifest["modalities"])


def _pack_blocks(store: Store, blocks: list[Block], params: dict[str, Any], workers: int,
                 bar: Progress) -> dict[str, dict]:
    """Every block's shard and marker, skipping blocks whose marker says the shard is stored."""
    # imported here, before the pool forks: each worker importing litdata costs about a second
    from litdata.streaming.writer import BinaryWriter  # noqa: F401

    task = bar.add_task("packing", total=sum(len(b.items) for b in blocks))
    staging = str(store.staging())
    markers: dict[str, dict] = {}
    jobs = []
    for b in blocks:
        marker = store.read_json(f"{STATE}/write/{b.name}.json")
        if marker is not None:
            markers[b.name] = marker
            bar.advance(task, len(b.items))
        else:
            jobs.append((b, params, staging))
    sizes = {b.name: len(b.items) for b in blocks}
    by_name = {b.name: b for b in blocks}
    for res in _run(pack_block, jobs, workers):
        path = res.pop("path", None)
        if path is not None:
            store.put_file(Path(path), by_name[res["block"]].shard)
        # the marker goes in after the shard: a kill in between only rewrites the same bytes
        store.write_json(f"{STATE}/write/{res['block']}.json", res)
        markers[res["block"]] = res
        bar.advance(task, sizes[res["block"]])
    return markers


def _verdicts(blocks: list[Block], markers: dict[str, dict]
              ) -> tuple[dict[str, list[dict]], list[Defect]]:
    """Each item's verdict and the pack's defects, from the blocks' decode results."""
    verdicts: dict[str, list[dict]] = {}
    defects: list[Defect] = []
    seen: set[tuple[str, str]] = set()
    for b in blocks:
        verdicts[b.name] = []
        for item, result in zip(b.items, markers[b.name]["results"], strict=True):
            verdict, found = judge(item, result)
            verdicts[b.name].append(asdict(verdict))
            for d in found:  # a clip shared by several groups is one defect
                if (d.kind, d.item) not in seen:
                    seen.add((d.kind, d.item))
                    defects.append(d)
    return verdicts, defects


def _tokenizer(store: Store, blocks: list[Block], verdicts: dict[str, list[dict]],
               vocab_size: int) -> TextTokenizer:
    """Trained once on the kept train captions; a resumed pack reuses the stored one."""
    stored = store.read(TOKENIZER)
    if stored is not None:
        return TextTokenizer.from_json(stored.decode())
    texts = [t for b in blocks if b.split == "train"
             for item, v in zip(b.items, verdicts[b.name], strict=True) if v["keep"]
             for t in item.captions]
    if not texts:
        raise NlmmError("the train split has no usable group (every image or clip failed to "
                        "decode or none is in train); run `nlmm data check` to see the defects.")
    tokenizer = TextTokenizer.train(texts, vocab_size)
    store.write(TOKENIZER, tokenizer.to_json().encode())
    return tokenizer


def _offsets(blocks: list[Block], markers: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """Dense group and caption index of each block's first kept group, over the whole pack."""
    out, group, caption = {}, 0, 0
    for b in blocks:
        out[b.name] = (group, caption)
        group += markers[b.name]["samples"]
        caption += markers[b.name]["captions"]
    return out


def _write_index(store: Store, split: str, blocks: list[Block], shards: dict[str, dict],
                 fp: str, target: int) -> None:
    """litdata's index.json of a split: the chunks in block order. `updated_at` names the
    pack's fingerprint, so a repacked prefix is never mistaken for a cached older one."""
    chunks, config = [], None
    for b in blocks:
        m = shards[b.name]
        if b.split != split or m["chunk"] is None:
            continue
        chunks.append(m["chunk"])
        if config is not None and config["data_format"] != m["config"]["data_format"]:
            raise RuntimeError(f"block {b.name} has data format {m['config']['data_format']}, "
                               f"not {config['data_format']}")
        config = config or dict(m["config"])
    if config is None:
        return  # an empty split has no folder; the manifest says it has 0 groups
    config.update(chunk_size=None, chunk_bytes=target)
    store.write_json(f"{split}/{INDEX}", {"chunks": chunks, "config": config,
                                         "updated_at": fp[:16]})


def _manifest(corpus: Corpus, blocks: list[Block], verdicts: dict[str, list[dict]],
              defects: list[Defect], shards: dict[str, dict], fp: str, vocab_size: int,
              target: int, tokenizer: TextTokenizer, params: dict[str, Any]) -> dict[str, Any]:
    import litdata

    groups, captions, has_audio, image_ok, clip_ok = [], [], {}, set(), set()
    splits = {s: {"groups": 0, "captions": 0, "first_group": None, "first_caption": None,
                  "shards": 0} for s in SPLITS}
    offsets = _offsets(blocks, shards)
    for b in blocks:
        info = splits[b.split]
        if info["first_group"] is None:
            info["first_group"], info["first_caption"] = offsets[b.name]
        info["shards"] += shards[b.name]["chunk"] is not None
        for item, v in zip(b.items, verdicts[b.name], strict=True):
            if not v["keep"]:
                continue
            info["groups"] += 1
            info["captions"] += len(item.captions)
            groups.append(Group(item.gid, item.split))
            image_ok |= {item.gid} if v["image"] else set()
            clip_ok |= {item.gid} if v["clip"] else set()
            for i, text in enumerate(item.captions):
                captions.append(Caption(item.gid, i, text))
                has_audio[(item.gid, i)] = v["audio"][i]
    counts = tally(groups, captions, has_audio, image_ok, clip_ok)
    for s in SPLITS:
        counts[s]["groups"] = splits[s]["groups"]
        counts[s]["readings"] = sum(v["readings"][i] for b in blocks if b.split == s
                                    for v in verdicts[b.name] if v["keep"]
                                    for i in range(len(v["readings"])))
    counts["total"]["groups"] = sum(counts[s]["groups"] for s in SPLITS)
    counts["total"]["readings"] = sum(counts[s]["readings"] for s in SPLITS)
    total = counts["total"]
    modalities = [m for m, n in (("image", total["images"]), ("text", total["captions"]),
                                 ("audio", total["wavs"])) if n]
    longest = max((shards[b.name]["longest_audio"] for b in blocks), default=0)
    return {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "fingerprint": fp,
        "corpus": {"format": corpus.format, "root": str(corpus.root),
                   "unassigned_groups": len(corpus.unassigned_groups()),
                   "reader_defects": [asdict(d) for d in corpus.defects]},
        "vocab_size": vocab_size,
        "tokenizer": {"file": TOKENIZER, "vocab": tokenizer.vocab_size},
        # what the stored features were made with: a run must train with the same settings
        "features": {**params, "longest_audio_samples": longest,
                     "image": f"(image_size, image_size) centre crop; JPEG (quality "
                              f"{JPEG_QUALITY}) for JPEG sources, PNG for others, the original "
                              "bytes where already that size",
                     "audio": "float16 log-mel (n_mels, frames), features.log_mel"},
        "chunk_bytes": target,
        "litdata": litdata.__version__,
        "counts": counts,
        "splits": splits,
        "modalities": modalities,
        "defects": [asdict(d) for d in defects],
        "shards": {f"{b.split}/{m['chunk']['filename']}": {
            "sha256": m["sha256"], "bytes": m["bytes"], "samples": m["samples"], "block": b.name,
            "first_group": offsets[b.name][0], "first_caption": offsets[b.name][1]}
            for b in blocks if (m := shards[b.name])["chunk"] is not None},
    }


# --------------------------------------------------------------------------- reading back

def read_manifest(input_dir: str | Path, storage_options: dict[str, Any] | None = None) -> dict:
    """The pack's manifest, or a one-sentence NlmmError when `input_dir` holds no finished pack."""
    store = open_store(input_dir, storage_options)
    with store_error_context(store):
        manifest = store.read_json(MANIFEST)
    if manifest is None:
        if store.read_json(PLAN) is not None:
            raise NlmmError(f"the pack in {input_dir} is unfinished; rerun `nlmm data pack` with "
                            "the same corpus and output to complete it.")
        raise NlmmError(f"{input_dir} holds no pack ({MANIFEST} is missing); write one with "
                        "`nlmm data pack CORPUS --out DIR`.")
    if manifest.get("format") != PACK_FORMAT or manifest.get("version") != PACK_VERSION:
        raise NlmmError(f"{input_dir} holds a pack of format version {manifest.get('version')}, "
                        f"this nlmm reads version {PACK_VERSION}; repack it with `nlmm data pack`.")
    return manifest


def read_tokenizer(input_dir: str | Path,
                   storage_options: dict[str, Any] | None = None) -> TextTokenizer:
    store = open_store(input_dir, storage_options)
    with store_error_context(store):
        data = store.read(TOKENIZER)
    if data is None:
        raise NlmmError(f"{input_dir} has no {TOKENIZER}; repack it with `nlmm data pack`.")
    return TextTokenizer.from_json(data.decode())


def feature_mismatch(manifest: dict[str, Any], cfg: DataConfig) -> dict[str, tuple[Any, Any]]:
    """The data settings of `cfg` that differ from those the pack's features were made with,
    as {name: (pack's, cfg's)}, counting only what the pack holds: image_size when it has
    images, the mel parameters when it has audio, and max_audio_seconds only when a recording
    is longer than one of the two cuts (shorter ones give the same log-mel either way)."""
    made = manifest["features"]
    total = manifest["counts"]["total"]
    keys = (["image_size"] if total.get("images") else []) + (
        ["sample_rate", "n_mels", "win_length", "hop_length"] if total.get("wavs") else [])
    out = {k: (made[k], getattr(cfg, k)) for k in keys if made[k] != getattr(cfg, k)}
    if total.get("wavs") and made["sample_rate"] == cfg.sample_rate:
        cuts = [round(s * cfg.sample_rate) for s in (made["max_audio_seconds"],
                                                     cfg.max_audio_seconds)]
        if cuts[0] != cuts[1] and made["longest_audio_samples"] > min(cuts):
            out["max_audio_seconds"] = (made["max_audio_seconds"], cfg.max_audio_seconds)
    return out


def check_features(manifest: dict[str, Any], cfg: DataConfig, where: str) -> None:
    """Refuse, in one sentence, data settings other than those the pack was made with."""
    differ = feature_mismatch(manifest, cfg)
    if differ:
        made = " ".join(f"--set data.{k}={v[0]}" for k, v in differ.items())
        asked = " ".join(f"--set data.{k}={v[1]}" for k, v in differ.items())
        raise NlmmError(f"the pack in {where} holds features made with other data settings "
                        f"than this run's; train with `{made}` or repack the corpus with "
                        f"`nlmm data pack SRC OUT {asked}`.")


def corrupted_shard_error(input_dir: str, name: str, why: str) -> NlmmError:
    return NlmmError(f"shard {name} of the pack in {input_dir} is corrupted ({why}); rerun "
                     "`nlmm data pack` with the same corpus and output to rewrite just that "
                     "shard, or restore the file from a copy.")


def verify_pack(input_dir: str | Path, storage_options: dict[str, Any] | None = None,
                full: bool = True) -> list[str]:
    """Names of the shards whose size or (with `full`) sha256 differs from the manifest."""
    manifest = read_manifest(input_dir, storage_options)
    store = open_store(input_dir, storage_options)
    with store_error_context(store):
        sizes = store.sizes()
        bad = []
        for name, meta in manifest["shards"].items():
            if sizes.get(name) != meta["bytes"]:
                bad.append(name)
            elif full:
                local = store.local_path(name)
                digest = (sha256_file(local) if local is not None
                          else hashlib.sha256(store.read(name) or b"").hexdigest())
                if digest != meta["sha256"]:
                    bad.append(name)
    return bad

