"""Where a pack lives: a local folder or an s3:// prefix, seen as a flat set of named files.

nlmm.data.packed writes a pack through a Store; nlmm.data.pack_index and nlmm.data.pack_reader
read it back through one. An S3 store takes boto3's client keyword arguments
(`storage_options`, e.g. endpoint_url) or boto3's environment (AWS_ENDPOINT_URL, credentials),
and turns the errors a user can fix (no endpoint, no credentials, no access) into one sentence.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nlmm.errors import NlmmError

STATE = ".pack"  # a pack's progress folder; a local store stages its files under it


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
