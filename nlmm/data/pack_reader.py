"""A packed split's samples read one by one, in any order, in any process.

litdata's reader serves a worker's chunks one after the other (it unmaps, or for a remote
dataset deletes, a chunk as soon as the next one begins), which is how its own sampler deals
them. nlmm's order (nlmm.data.stream) reads a rank's lanes from several chunks at once, so the
shards are read here: each chunk's offset table once, then one pread per sample, decoded by
litdata's item loader (the typed fields of the format it wrote). Nothing is memory-mapped, so a
process holds the samples it is working on, whatever the size of the pack.

A pack on object storage is downloaded chunk by chunk into a local cache folder (one per pack
fingerprint, split and rank, under $NLMM_PACK_CACHE, default ~/.cache/nlmm/packs), each chunk
under a file lock so that the loader workers of a rank fetch it once; the order says when a
rank is done with a chunk and it is deleted then, so the cache holds about one chunk per lane of
the rank. A chunk's sha256 is checked against nlmm_pack.json before it is read (a local pack's
file in place, a remote one's as downloaded), once per machine while the file is unchanged: a
memo in the cache folder keyed by the file's size, times and inode records the check, so the
workers of every epoch do not hash the whole pack again. A mismatch is an error that names the
shard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nlmm.data.pack_index import INDEX, corrupted_shard_error, sha256_file
from nlmm.data.pack_store import S3Store, open_store, store_error_context
from nlmm.errors import NlmmError

OPEN_FILES = 64  # chunk files a process keeps open; more are reopened as needed
CACHE_ENV = "NLMM_PACK_CACHE"  # where remote chunks and the sha256 memos go


class ShardError(NlmmError):
    """A shard that cannot be read as nlmm_pack.json describes it; the message names it."""


@dataclass(frozen=True)
class Shard:
    """One chunk of a split as nlmm_pack.json lists it, in the split's index.json order."""

    name: str  # file name inside the split's folder
    samples: int
    first_group: int  # the pack's dense index of the shard's group 0 (and caption 0)
    first_caption: int
    sha256: str
    bytes: int


def split_shards(manifest: dict[str, Any], split: str) -> list[Shard]:
    """The split's shards in chunk order (block order: chunk-NNNNN names sort as written)."""
    prefix = f"{split}/"
    return [Shard(name[len(prefix):], m["samples"], m["first_group"], m["first_caption"],
                  m["sha256"], m["bytes"])
            for name, m in sorted(manifest["shards"].items()) if name.startswith(prefix)]


class ShardReader:
    """Samples of one split by (chunk, item). Built in the main process and used in each loader
    worker: files, clients and litdata's decoder are opened lazily per process."""

    def __init__(self, url: str, split: str, shards: list[Shard], fingerprint: str, *,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 rank: int = 0, verify: bool = True) -> None:
        self.url, self.split, self.shards = url.rstrip("/"), split, shards
        self.storage_options, self.verify = storage_options, verify
        self.remote = "://" in self.url
        root = Path(cache_dir or os.environ.get(CACHE_ENV)
                    or Path.home() / ".cache" / "nlmm" / "packs") / fingerprint[:16] / split
        # per rank: ranks on one machine never delete a chunk another rank still reads
        self.cache = root / f"rank{rank}"
        self.memos = root / "checked"
        self._pid: int | None = None

    # ------------------------------------------------------------------ per process

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        from litdata.streaming.config import ChunksConfig
        from litdata.streaming.item_loader import PyTreeLoader
        from litdata.streaming.serializers import _SERIALIZERS

        self._pid = os.getpid()
        self._files: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()
        self._checked: set[int] = set()
        self._store = open_store(self.url, self.storage_options) if self.remote else None
        folder = self._index_folder()
        self._decoder = ChunksConfig(str(folder), _SERIALIZERS, None, PyTreeLoader())._item_loader

    def _index_folder(self) -> Path:
        """The folder holding the split's index.json (litdata's decoder reads its format)."""
        if not self.remote:
            return Path(self.url) / self.split
        self.cache.mkdir(parents=True, exist_ok=True)
        if not (self.cache / INDEX).is_file():
            with store_error_context(self._store):
                data = self._store.read(f"{self.split}/{INDEX}")
            if data is None:
                raise ShardError(f"the pack in {self.url} has no {self.split}/{INDEX}; rerun "
                                 "`nlmm data pack` with the same corpus and output.")
            tmp = self.cache / f".{INDEX}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, self.cache / INDEX)
        return self.cache

    # ------------------------------------------------------------------ chunks

    def _path(self, chunk: int) -> Path:
        if not self.remote:
            return Path(self.url) / self.split / self.shards[chunk].name
        path = self.cache / self.shards[chunk].name
        if not path.is_file():
            self.fetch(chunk)
        return path

    def fetch(self, chunk: int) -> None:
        """Download a remote chunk into the cache unless it is there (any worker of the rank
        may ask; the lock makes one of them download it)."""
        self._open()
        shard = self.shards[chunk]
        path = self.cache / shard.name
        with _locked(path):
            if path.is_file():
                return
            tmp = path.with_name(f".{shard.name}.{os.getpid()}")
            assert isinstance(self._store, S3Store)
            with store_error_context(self._store):
                self._store.get_file(f"{self.split}/{shard.name}", tmp)
            if self.verify and sha256_file(tmp) != shard.sha256:
                tmp.unlink()
                raise self._corrupted(chunk)
            os.replace(tmp, path)
            if self.verify:
                self._remember(chunk, path)

    def release(self, chunk: int) -> None:
        """Delete a remote chunk from the cache: the rank has read all it needs of it."""
        if not self.remote:
            return
        self._open()
        self._close(chunk)
        path = self.cache / self.shards[chunk].name
        with _locked(path), contextlib.suppress(FileNotFoundError):
            path.unlink()

    def cached(self) -> list[int]:
        """Chunks of a remote pack now in the cache."""
        return [i for i, s in enumerate(self.shards) if (self.cache / s.name).is_file()]

    def _corrupted(self, chunk: int) -> ShardError:
        error = corrupted_shard_error(self.url, f"{self.split}/{self.shards[chunk].name}",
                                      "its sha256 differs from nlmm_pack.json")
        return ShardError(str(error))

    def _file(self, chunk: int) -> tuple[int, np.ndarray]:
        """The chunk's open file and offset table, checked against its sha256 on first use."""
        if chunk in self._files:
            self._files.move_to_end(chunk)
            return self._files[chunk]
        path = self._path(chunk)
        if self.verify and chunk not in self._checked:
            self._check(chunk, path)
        fd = os.open(path, os.O_RDONLY)
        head = os.pread(fd, 4, 0)
        count = int.from_bytes(head, "little") if len(head) == 4 else -1
        table = os.pread(fd, 4 * (count + 1), 4) if count >= 0 else b""
        if count != self.shards[chunk].samples or len(table) != 4 * (count + 1):
            os.close(fd)
            raise self._corrupted(chunk)
        self._files[chunk] = (fd, np.frombuffer(table, dtype="<u4").astype(np.int64))
        while len(self._files) > OPEN_FILES:
            os.close(self._files.popitem(last=False)[1][0])
        return self._files[chunk]

    def _check(self, chunk: int, path: Path) -> None:
        """Raise unless the file's sha256 is the manifest's; hashed only when no memo says this
        very file (size, times, inode) was checked, and under the memo's lock, so that the
        workers of a rank hash a chunk once."""
        memo = self._memo(chunk)
        with _locked(memo):
            try:
                done = json.loads(memo.read_text()) == self._stamp(chunk, path)
            except (OSError, ValueError):
                done = False
            if not done:
                if sha256_file(path) != self.shards[chunk].sha256:
                    raise self._corrupted(chunk)
                self._remember(chunk, path)
        self._checked.add(chunk)

    def _memo(self, chunk: int) -> Path:
        self.memos.mkdir(parents=True, exist_ok=True)
        return self.memos / f"{self.shards[chunk].name}.json"

    def _stamp(self, chunk: int, path: Path) -> dict[str, Any]:
        st = path.stat()  # an atomic replace or an edit in place changes one of these
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "inode": st.st_ino, "sha256": self.shards[chunk].sha256}

    def _remember(self, chunk: int, path: Path) -> None:
        memo = self._memo(chunk)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self._stamp(chunk, path)))
        os.replace(tmp, memo)
        self._checked.add(chunk)

    def _close(self, chunk: int) -> None:
        if chunk in self._files:
            os.close(self._files.pop(chunk)[0])

    # ------------------------------------------------------------------ samples

    def read(self, rows: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """The samples at (chunk, item) rows, in the order asked (read in file order), with
        their group and caption indices made dense over the pack."""
        self._open()
        out: list[dict[str, Any] | None] = [None] * len(rows)
        for i in sorted(range(len(rows)), key=rows.__getitem__):
            out[i] = self._read_one(*rows[i])
        return out  # type: ignore[return-value]

    def _read_one(self, chunk: int, item: int) -> dict[str, Any]:
        fd, table = self._file(chunk)
        start, end = int(table[item]), int(table[item + 1])
        data = os.pread(fd, end - start, start)
        try:
            sample = self._decoder.load_item_from_bytes(data, chunk)
        except Exception:
            raise self._corrupted(chunk) from None  # garbage read: the hash check was off
        shard = self.shards[chunk]
        # a shard counts its groups and captions from 0; the pack's offsets make them dense
        sample["group"] += shard.first_group
        sample["caption_base"] += shard.first_caption
        return sample


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`'s lock file; the system drops it when a process dies, so a
    killed worker never leaves the others waiting."""
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
