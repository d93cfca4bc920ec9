"""Weights-only copies of checkpoints: derived once, then read memory-mapped by every load.

A training checkpoint is a pickle of everything a run needs to resume (weights, the per-level
optimizer states, RNG), about 3x the weights, and `torch.load` reads all of it. The first load
of a checkpoint for inference writes its model's state dict as safetensors under
`<run>/weights/<checkpoint stem>-<key>.safetensors`, with the checkpoint's small entries
(config, tokenizer, data cache, metrics, progress) as JSON in the file's metadata. Later loads
map that file: no unpickling, and pages of the weights are read only when a query touches them.

The key is a digest of the checkpoint's zip directory (`checkpoint_key`). `torch.save` writes a
zip archive whose directory holds the CRC-32 and size of every record (each tensor, the pickled
config and tokenizer), so the digest changes with any byte of the checkpoint, yet computing it
reads a few kilobytes at the end of the file instead of the whole gigabytes. A replaced
checkpoint therefore always names another cache file and never serves the old weights; the copy
of the replaced one is deleted when the new one is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

import nlmm
from nlmm.errors import NlmmError
from nlmm.paths import checkpoint_home, prune_least_recent

FORMAT = "nlmm-weights"
FORMAT_VERSION = 1
METADATA_KEY = "nlmm"
# Entries of a checkpoint that inference reads besides the weights; the rest (optimizer states,
# RNG, scheduler) only matter for resuming training.
PAYLOAD_KEYS = ("format", "format_version", "nlmm_version", "config", "tokenizer", "data",
                "metrics", "progress")
# Files kept per weights folder, most recently used first: best.pt, last.pt and one more.
T = TypeVar("T")
# Times a checkpoint replaced while it is being read is read again before giving up.
READ_ATTEMPTS = 3
KEEP_WEIGHTS_FILES = 3
# A temporary file this old was left by a writer that died (a write takes seconds).
STALE_TEMP_SECONDS = 3600


def checkpoint_key(path: Path) -> str | None:
    """SHA-256 of the name, CRC-32 and size of every record in the checkpoint's zip directory
    (see the module docstring); None when the file is missing or not a zip archive, which
    `load_checkpoint` then reports in its own words."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                digest.update(f"{info.filename}\0{info.CRC:08x}\0{info.file_size}\n".encode())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None
    return digest.hexdigest()


def read_unreplaced(path: Path, read: Callable[[], T],
                    attempts: int = READ_ATTEMPTS) -> tuple[T, str | None]:
    """`read()` and the checkpoint key of the very bytes it read. Training replaces checkpoints
    as it goes: the key is taken before and after, and a read the file was replaced during is
    done again, so nothing is ever filed under the key of other weights."""
    key = checkpoint_key(path)
    for _ in range(attempts):
        value = read()
        after = checkpoint_key(path)
        if after == key:
            return value, key
        key = after
    raise NlmmError(f"checkpoint {path} was replaced {attempts} times while being read; try "
                    "again when training has saved it.")


def weights_dir_for(checkpoint: Path) -> Path:
    """`<run>/weights` for a checkpoint in `<run>/checkpoints`, else `weights` beside it."""
    return checkpoint_home(Path(checkpoint).resolve()) / "weights"


def weights_path(checkpoint: Path, key: str) -> Path:
    return weights_dir_for(checkpoint) / f"{Path(checkpoint).stem}-{key[:16]}.safetensors"


def small_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The entries of a checkpoint that inference reads besides the weights."""
    return {k: payload[k] for k in PAYLOAD_KEYS if k in payload}


def read_weights(path: Path, key: str,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(state dict, small payload) memory-mapped from `path` when it is an intact copy of the
    checkpoint with `key` written by this nlmm version; None otherwise (derive it again)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as reader:
            meta = json.loads((reader.metadata() or {}).get(METADATA_KEY, "{}"))
            if (meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION
                    or meta.get("nlmm_version") != nlmm.__version__ or meta.get("source") != key):
                return None
            state = {name: reader.get_tensor(name) for name in reader.keys()}
    except (OSError, SafetensorError, ValueError, AttributeError):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used, for prune_weights
    return state, meta["payload"]


def write_weights(path: Path, key: str, state: dict[str, torch.Tensor],
                  payload: dict[str, Any]) -> bool:
    """Write the copy via a temporary file and a rename, then delete older copies of the same
    checkpoint and all but the most recently used files; False when the folder is not writable
    (the caller keeps its model, and the next load derives again)."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "nlmm_version": nlmm.__version__, "source": key, "payload": payload}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # safetensors stores contiguous tensors only
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):  # TypeError: an entry JSON cannot hold
        tmp.unlink(missing_ok=True)
        return False
    prune_weights(path)
    return True


def prune_weights(kept: Path, keep: int = KEEP_WEIGHTS_FILES) -> list[Path]:
    """Delete the other copies of `kept`'s checkpoint (stale by construction), temporary files
    of dead writers, and all but the `keep` most recently used copies; returns the deleted."""
    removed, others = [], []
    for path in kept.parent.iterdir():
        try:
            if ".tmp-" in path.name:
                if time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    path.unlink()
                    removed.append(path)
            elif path.suffix == ".safetensors" and path != kept:
                if _checkpoint_stem(path) == _checkpoint_stem(kept):
                    path.unlink()
                    removed.append(path)
                else:
                    others.append(path)
        except FileNotFoundError:
            continue
    return removed + prune_least_recent(others, keep - 1)


def _checkpoint_stem(copy: Path) -> str:
    return copy.name.rsplit("-", 1)[0]
