"""A pack's files and what they say: the names of its layout, nlmm_pack.json and the tokenizer
read back, a run's data settings checked against the stored features, and every shard's
integrity (sha256 and size as the manifest records them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from nlmm.config import DataConfig
from nlmm.data.pack_store import STATE, open_store, store_error_context
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

PACK_FORMAT = "nlmm-pack"
PACK_VERSION = 2  # 2: images and log-mels made at pack time, shard-relative indices
MANIFEST = "nlmm_pack.json"
TOKENIZER = "tokenizer.json"
PLAN = f"{STATE}/plan.json"
INDEX = "index.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


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
