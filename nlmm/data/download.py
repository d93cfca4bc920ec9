"""Downloads Flickr8k and the Flickr Audio Caption Corpus and unpacks them into the public layout.

`dest/Flickr8k_Dataset/*.jpg`, `dest/Flickr8k_text/Flickr8k.token.txt` (and the split files),
`dest/flickr_audio/wavs/*.wav` and `dest/flickr_audio/wav2capt.txt`. Archives land in
`dest/downloads/` as `<name>.part`, resume with HTTP Range requests, are checked against the
size the server announced and their MD5, and are renamed to `<name>` only once verified.

A part of the corpus counts as present only when it holds every file the corpus's own text
files name (the caption and split files for images, `wav2capt.txt` for wavs), so an
incomplete folder is completed on the next call. An unpacked archive is checked the same way
before anything is moved into `dest`, and an archive is deleted only after its contents passed;
an archive that fails a check is kept and never unpacked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from nlmm.data.corpora.base import IMAGE_SUFFIXES, list_files
from nlmm.data.corpora.flickr8k import (AUDIO_DIR, IMAGE_DIRS, SPLIT_FILES, TEXT_DIRS, TOKEN_FILE,
                                        find_text_dir, named_images, named_wavs)
from nlmm.errors import NlmmError

_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    md5: str
    target: str                               # folder under dest that the archive provides
    places: tuple[str, ...]                   # folders under dest that may hold its contents
    holds: Callable[[Path], bool]             # recognises that folder inside the unpacked archive
    lacks: Callable[[Path, Path], list[str]]  # (folder, dest) -> files the corpus names but
                                              # folder does not hold

    def present(self, dest: Path) -> bool:
        """Whether some folder under `dest` already holds every file of this archive's part."""
        return any((dest / p).is_dir() and not self.lacks(dest / p, dest) for p in self.places)


def _text_lacks(folder: Path, dest: Path) -> list[str]:
    return [n for n in (TOKEN_FILE, *SPLIT_FILES.values()) if not (folder / n).is_file()]


def _images_lacks(folder: Path, dest: Path) -> list[str]:
    text_dir = find_text_dir(dest)
    if text_dir is None:
        return [TOKEN_FILE]  # without the caption file no image can be judged present
    return sorted(named_images(text_dir) - set(list_files(folder, IMAGE_SUFFIXES)))


def _audio_lacks(folder: Path, dest: Path) -> list[str]:
    if not (folder / "wav2capt.txt").is_file():
        return ["wav2capt.txt"]
    if not (folder / "wavs").is_dir():
        return ["wavs/"]
    return sorted(named_wavs(folder / "wav2capt.txt") - set(list_files(folder / "wavs", (".wav",))))


def _holds_jpgs(folder: Path) -> bool:
    return any(list_files(folder, IMAGE_SUFFIXES))


def _holds(name: str) -> Callable[[Path], bool]:
    return lambda folder: (folder / name).is_file()


# Text first: the caption and split files it brings name the images the image zip must hold.
# The zips' MD5s are those the R torchvision package (mlverse/torchvision, dataset-flickr.R) and
# CMake's EXPECTED_MD5 in independent build scripts check these exact URLs against; FACC's is
# the one its publisher lists beside the download.
ARCHIVES: tuple[Archive, ...] = (
    Archive("Flickr8k_text.zip",
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
            "bf6c1abcb8e4a833b7f922104de18627", "Flickr8k_text", TEXT_DIRS,
            _holds(TOKEN_FILE), _text_lacks),
    Archive("Flickr8k_Dataset.zip",
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
            "f18a1e2920de5bd84dae7cf08ec78978", "Flickr8k_Dataset", IMAGE_DIRS,
            _holds_jpgs, _images_lacks),
    Archive("flickr_audio.tar.gz",
            "https://groups.csail.mit.edu/sls/downloads/flickraudio/downloads/flickr_audio.tar.gz",
            "9d078f1f150c26e864aa64d1d733779a", AUDIO_DIR, (AUDIO_DIR,),
            _holds("wav2capt.txt"), _audio_lacks),
)


def missing_archives(dest: Path) -> list[str]:
    """Names of the archives whose part of the corpus `dest` does not hold in full."""
    return [a.name for a in ARCHIVES if not a.present(Path(dest))]


def download_flickr8k(dest: Path, *, urls: dict[str, str] | None = None, progress: bool = True,
                      timeout: float = 10.0, md5s: dict[str, str] | None = None,
                      retries: int = 3, keep_archives: bool = False) -> Path:
    """Fetches, verifies and unpacks whatever part of Flickr8k + FACC is not in `dest` yet.

    `urls` and `md5s` replace the address or checksum of archives by name; `retries` is how
    many times an interrupted transfer resumes within this call; archives are deleted once
    their unpacked contents passed their check, unless `keep_archives`.
    """
    dest = Path(dest)
    urls = urls or {}
    md5s = md5s or {}
    unknown = (set(urls) | set(md5s)) - {a.name for a in ARCHIVES}
    if unknown:
        raise NlmmError(f"Unknown archive name(s) {', '.join(sorted(unknown))}; use "
                        f"{', '.join(a.name for a in ARCHIVES)}.")
    wanted = [dataclasses.replace(a, url=urls.get(a.name, a.url), md5=md5s.get(a.name, a.md5))
              for a in ARCHIVES]
    if all(a.present(dest) for a in wanted):
        return dest

    downloads = dest / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        for archive in wanted:
            # judged when its turn comes: the images are judged against the caption file,
            # which the text archive may just have brought or replaced
            if archive.present(dest):
                continue
            path = downloads / archive.name
            if path.exists():
                verify_md5(archive, path)  # may have been placed by hand, never checked
            else:
                missing = [a for a in wanted if not a.present(dest)]
                _fetch(archive, path, missing, dest, timeout, retries, bar)
            _unpack(archive, path, dest, bar)
            if not keep_archives:
                path.unlink()
    return dest


def _offline_error(archive: Archive, reason: str, missing: list[Archive], dest: Path) -> NlmmError:
    return NlmmError(
        f"Could not download {archive.name} from {archive.url} ({reason}); fetch "
        f"{', '.join(a.url for a in missing)} yourself into {dest / 'downloads'} (or unpack them "
        f"into {dest}) and rerun, or run `nlmm data synth` to make an offline corpus.")


def _fetch(archive: Archive, path: Path, missing: list[Archive], dest: Path, timeout: float,
           retries: int, bar: Progress) -> None:
    """Downloads `archive` to `path` through `<path>.part`, resuming until complete and verified."""
    part = path.with_name(path.name + ".part")
    task = bar.add_task(f"download {archive.name}", total=None)
    size = 0
    for _ in range(retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "nlmm"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(archive.url, headers=headers),
                                              timeout=timeout)
        except urllib.error.HTTPError as exc:
            unsatisfied = _UNSATISFIED_RANGE.match(exc.headers.get("Content-Range", ""))
            if exc.code == 416 and offset and unsatisfied:
                # The .part already holds every byte the server has, or more than it has.
                if offset == int(unsatisfied.group(1)):
                    return _finish(archive, part, path, offset, bar, task)
                part.unlink()
                continue
            raise _offline_error(archive, f"HTTP {exc.code} {exc.reason}", missing, dest) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _offline_error(archive, str(reason), missing, dest) from exc

        with response:
            if response.status == 206:
                match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != offset:
                    part.unlink()  # a partial answer that does not continue our file
                    continue
                total = None if match.group(3) == "*" else int(match.group(3))
            else:
                offset = 0  # the server ignored Range: start over
                length = response.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None
            bar.update(task, total=total, completed=offset)
            interrupted = False
            try:
                with open(part, "ab" if offset else "wb") as out:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        bar.advance(task, len(chunk))
            except (OSError, http.client.HTTPException):
                interrupted = True  # a dropped or stalled connection: resume on the next pass
        size = part.stat().st_size
        if not interrupted and (total is None or size == total):
            return _finish(archive, part, path, size, bar, task)
        if total is not None and size > total:
            part.unlink()
            raise NlmmError(f"{archive.name} came out larger than the server announced ({size} > "
                            f"{total} bytes) and was deleted; rerun to download it again.")
    raise NlmmError(f"The download of {archive.name} from {archive.url} kept being interrupted "
                    f"({size} bytes so far are in {part}); rerun to resume it.")


def _finish(archive: Archive, part: Path, path: Path, size: int, bar: Progress,
            task: TaskID) -> None:
    bar.update(task, total=size, completed=size)
    verify_md5(archive, part)
    os.replace(part, path)


def verify_md5(archive: Archive, path: Path) -> None:
    """Raises when the MD5 of `path` differs from the archive's; the file is kept for a look."""
    digest = _md5(path)
    if digest != archive.md5.lower():
        raise NlmmError(f"{path} failed the MD5 check of {archive.name} (got {digest}, expected "
                        f"{archive.md5}), so nothing was unpacked; delete it and rerun to "
                        f"download it again.")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _CountingReader:
    """A read-only file wrapper that reports bytes read, for progress over a streamed tar.gz."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None]) -> None:
        self.raw = raw
        self.on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.on_read(len(data))
        return data


def _member_path(archive: Archive, name: str, downloads: Path) -> PurePosixPath | None:
    """The member's relative path; None for macOS metadata; an error for paths leaving the root."""
    path = PurePosixPath(name.replace("\\", "/"))
    if "__MACOSX" in path.parts or path.name == ".DS_Store":
        return None
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise NlmmError(f"{archive.name} contains the unsafe path {name!r}, so it was not "
                        f"unpacked; delete it from {downloads} and download it again.")
    return path


def _unpack(archive: Archive, path: Path, dest: Path, bar: Progress) -> None:
    """Unpacks into a scratch folder, then moves the archive's folder into the layout."""
    scratch = path.with_name(path.name + ".unpacked")
    if scratch.exists():
        shutil.rmtree(scratch)  # left over from an interrupted unpack
    scratch.mkdir()
    task = bar.add_task(f"unpack {archive.name}", total=path.stat().st_size)
    try:
        if archive.name.endswith(".zip"):
            _unzip(archive, path, scratch, lambda n: bar.advance(task, n))
        else:
            _untar(archive, path, scratch, lambda n: bar.advance(task, n))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(scratch)
        raise NlmmError(f"{path} could not be unpacked ({exc}); delete it and rerun to "
                        "download it again.") from exc
    found = next((d for d in [scratch, *sorted(p for p in scratch.rglob("*") if p.is_dir())]
                  if archive.holds(d)), None)
    if found is None:
        shutil.rmtree(scratch)
        raise NlmmError(f"{archive.name} does not contain the expected {archive.target} files, "
                        f"so nothing was unpacked; delete {path} and rerun to download it again.")
    lacking = archive.lacks(found, dest)
    if lacking:
        shutil.rmtree(scratch)
        raise NlmmError(f"{archive.name} lacks {len(lacking)} file(s) that the corpus names "
                        f"({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''}), so "
                        f"nothing was unpacked; delete {path} and rerun to download it again.")
    _merge_move(found, dest / archive.target)
    shutil.rmtree(scratch, ignore_errors=True)


def _unzip(archive: Archive, path: Path, root: Path, advance: Callable[[int], None]) -> None:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            rel = _member_path(archive, info.filename, path.parent)
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if rel is None or is_link or not rel.parts:
                continue
            target = root.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            advance(info.compress_size)


def _untar(archive: Archive, path: Path, root: Path, advance: Callable[[int], None]) -> None:
    with open(path, "rb") as raw, \
            tarfile.open(fileobj=_CountingReader(raw, advance), mode="r|*") as tf:
        for member in tf:
            rel = _member_path(archive, member.name, path.parent)
            if rel is None or not rel.parts:
                continue
            target = root.joinpath(*rel.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():  # links and devices are never needed and never followed
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)


def _merge_move(src: Path, dst: Path) -> None:
    """Moves `src` to `dst`; where `dst` exists (an earlier partial copy) entries are replaced."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge_move(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
