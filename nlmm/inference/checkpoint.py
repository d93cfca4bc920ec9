"""Checkpoints: written atomically, read back with one clear error when damaged or foreign."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

import nlmm
from nlmm.errors import NlmmError

FORMAT = "nlmm-checkpoint"
FORMAT_VERSION = 1
_TEMP_MARK = ".tmp-"
# What evaluation, search and export read from a checkpoint. A model snapshot (best.pt, the
# epoch_NNN.pt files) holds only these; last.pt also holds the optimizer, scheduler and RNG state
# that a resume needs, which for universal_anderson is 13 copies of the weights.
MODEL_KEYS = ("model", "config", "tokenizer", "data", "progress", "metrics")
# Room left on top of the tensors for the pickled structure, the tokenizer and the zip records.
_SPACE_MARGIN = 16 * 2**20


def model_snapshot(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a full training `payload` that using the model needs (see MODEL_KEYS)."""
    return {key: payload[key] for key in MODEL_KEYS if key in payload}


def _tensor_bytes(value: Any, seen: set[tuple[str, int]]) -> int:
    """Bytes of the tensor storages in `value` (nested dicts, lists and tuples), each counted once."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def _check_free_space(path: Path, body: dict[str, Any]) -> None:
    """NlmmError when the folder of `path` has no room for the new file beside the old one,
    which stays until the new one is complete."""
    needed = _tensor_bytes(body, set()) + _SPACE_MARGIN
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        kept = "the previous file there is kept" if path.is_file() else "nothing was written"
        raise NlmmError(f"not enough disk space for checkpoint {path}: it needs about "
                        f"{needed / 1e9:.2f} GB and {path.parent} has {free / 1e9:.2f} GB free; "
                        f"{kept}, so free space and continue the run with `nlmm train --resume "
                        f"RUN`.")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> int:
    """Write `payload` to `path` via a temp file, fsync and rename; returns the size in bytes.

    A crash at any moment leaves either the previous file or the new one, never a partial file
    under the final name. Too little free space for the new file fails before anything is
    written; a failed write (disk full, ...) removes the temp file. Both raise NlmmError and
    leave the previous file at `path` untouched, so the caller keeps pointing at it.
    """
    path = Path(path)
    tmp = _temp_path(path)
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "nlmm_version": nlmm.__version__,
            **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(path, body)
        with open(tmp, "wb") as fh:
            torch.save(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous file there is kept" if path.is_file() else "nothing was written"
        raise NlmmError(f"could not write checkpoint {path} ({exc.strerror or exc}); {kept}, so "
                        "free space or fix the folder's permissions and continue the run with "
                        "`nlmm train --resume RUN`.") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path.stat().st_size


def discard_partial_writes(folder: Path) -> list[Path]:
    """Delete the temp files that writers killed mid-save left in `folder`; returns them.

    Only call this while no process is saving into `folder` (a run's worker at start-up).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and _TEMP_MARK in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _damaged(path: Path) -> str | None:
    """Why the file is not an intact zip archive (torch.save's format), None when it is.

    torch.load does not check the CRC32 that torch.save stores for every record, so a flipped
    bit in the weights would load silently; reading the archive through zipfile checks them all.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        return type(exc).__name__
    return None if bad is None else f"bad CRC in {bad}"


def _opens(path: Path) -> bool:
    """Whether `path` is there and its archive directory reads (a truncated file's does not).

    Cheaper than `_damaged`, which reads every byte: this only picks which file to suggest."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        return False


def _other_checkpoints(path: Path) -> str:
    """What to do instead of loading a damaged `path`: another file of its run that still
    opens, never itself, or, when none does, restoring a copy or starting over."""
    epochs = sorted(path.parent.glob("epoch_*.pt"), reverse=True)  # the latest first
    others = [p for p in (path.with_name("last.pt"), path.with_name("best.pt"), *epochs)
              if p != path and _opens(p)]
    if not others:
        return (f"no other checkpoint in {path.parent} is intact, so restore the folder from a "
                f"copy (a backup of the runs folder) or start the run over with `nlmm train`")
    first = others[0]
    if path.name == "last.pt" and first.name == "best.pt":
        return (f"evaluate or search with {first} instead; to continue training, start a new "
                "run (the training state was only in this file)")
    kind = "the latest weights" if first.name == "last.pt" else "the weights of an earlier step"
    return f"use {first} ({kind}) instead"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; NlmmError when missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise NlmmError(f"checkpoint {path} does not exist; list checkpoints with `nlmm runs show RUN`.")
    damage = _damaged(path)
    if damage is None:
        try:
            body = torch.load(path, map_location=map_location, weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
                AttributeError, ImportError, IndexError, KeyError, OSError) as exc:
            damage = type(exc).__name__
    if damage is not None:
        raise NlmmError(f"checkpoint {path} is corrupt or truncated ({damage}); "
                        f"{_other_checkpoints(path)}.")
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise NlmmError(f"{path} is not an nlmm checkpoint; pass a file from runs/<run>/checkpoints/.")
    if body.get("format_version", 0) > FORMAT_VERSION:
        raise NlmmError(f"checkpoint {path} was written by a newer nlmm "
                        f"({body.get('nlmm_version')}); upgrade nlmm to read it.")
    return body
