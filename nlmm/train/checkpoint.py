"""Checkpoints: written atomically, read back with one clear error when damaged or foreign."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

import nlmm
from nlmm.errors import NlmmError

FORMAT = "nlmm-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> int:
    """Write `payload` to `path` via a temp file, fsync and rename; returns the size in bytes.

    A crash at any moment leaves either the previous file or the new one, never a partial file
    under the final name. On failure (disk full, ...) the temp file is removed and the error
    propagates, so the caller keeps pointing at the last good checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "nlmm_version": nlmm.__version__,
            **payload}
    try:
        with open(tmp, "wb") as fh:
            torch.save(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path.stat().st_size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; NlmmError when missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise NlmmError(f"checkpoint {path} does not exist; list checkpoints with `nlmm runs show RUN`.")
    try:
        body = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, KeyError, OSError) as exc:
        raise NlmmError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
                        "use another checkpoint of the run, e.g. best.pt or last.pt.") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise NlmmError(f"{path} is not an nlmm checkpoint; pass a file from runs/<run>/checkpoints/.")
    if body.get("format_version", 0) > FORMAT_VERSION:
        raise NlmmError(f"checkpoint {path} was written by a newer nlmm "
                        f"({body.get('nlmm_version')}); upgrade nlmm to read it.")
    return body
