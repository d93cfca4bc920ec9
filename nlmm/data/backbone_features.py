"""Backbone feature sets inside a prepared cache: computed once, memory-mapped, keyed by backbone.

A frozen backbone (`encoders.<modality>.frozen: true`) turns every image or spoken caption of
the cache into feature tokens once; training, evaluation and gallery indexing then read those
instead of pixels or log-mels, so the backbone never runs in the training loop. An unfrozen
speech backbone needs the raw waveforms, which the base cache does not keep: they are stored
here as 16-bit PCM. (An unfrozen image backbone reads the cached pixels.)

Layout: `<cache>/features/<modality>-<name>-<key>/` holding `values.npy`, for speech
`index.npz` (offsets and lengths per caption row, 0 frames for a caption without audio), and
`manifest.json`, written last. `values.npy` is image features (N_images, tokens, C) fp16 by
image row, speech features (frames, C) fp16 flat, or waveforms (samples,) int16 flat.

The key hashes the modality, the backbone, the weights' identity (the named weights' URL or the
SHA-256 of the weights file), the layer and the cache's own key (data parameters and sources).
Changing any of them selects another folder, so only the feature part is recomputed; the folder
of a weights file that changed in place is deleted when its replacement is built, and a rebuilt
base cache starts with no feature folders at all.

Speech clips are batched with padding only for models whose features do not depend on it
(`Backbone.pads_exactly`); the others run clip by clip, so a cached feature is exactly what a
search query of the same file gets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from nlmm.backbones import Backbone, BackboneSpec, weights_identity
from nlmm.config import BACKBONE_SAMPLE_RATE, DataConfig, EncodersConfig
from nlmm.data.cache import PreparedCache, locked, npy_header, progress_bar
from nlmm.data.features import PCM_SCALE, BadInput, load_clip, normalize_images
from nlmm.data.parallel import map_chunks
from nlmm.errors import NlmmError

FEATURES_DIR = "features"
FEATURES_VERSION = 1
VALUES = "values.npy"
INDEX = "index.npz"
MANIFEST = "manifest.json"
IMAGE_BATCH = {"cuda": 128, "cpu": 16}
# Seconds of padded audio per batch, for speech models that pad exactly.
AUDIO_BATCH_SECONDS = {"cuda": 600.0, "cpu": 60.0}


@dataclass(frozen=True)
class FeaturePlan:
    """One feature set a config needs: a frozen backbone's features, or raw waveforms
    (`spec` None) for an unfrozen speech backbone."""

    modality: str
    spec: BackboneSpec | None
    identity: str | None

    @property
    def kind(self) -> str:
        return "features" if self.spec is not None else "waveform"

    def params(self, cache: PreparedCache) -> dict[str, Any]:
        params: dict[str, Any] = {"version": FEATURES_VERSION, "modality": self.modality,
                                  "kind": self.kind, "cache_key": cache.key}
        if self.spec is not None:
            params |= {"backbone": self.spec.name, "weights_identity": self.identity,
                       "layer": self.spec.layer}
        return params

    def folder(self, cache: PreparedCache) -> str:
        blob = json.dumps(self.params(cache), sort_keys=True).encode()
        name = self.spec.name if self.spec is not None else "waveform"
        return f"{self.modality}-{name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def plan_features(encoders: EncodersConfig) -> list[FeaturePlan]:
    """The feature sets `encoders` needs (hashes weights files, downloads nothing)."""
    plans = []
    for modality in ("image", "audio"):
        spec = BackboneSpec.from_encoders(encoders, modality)
        if spec is None:
            continue
        if spec.frozen:
            plans.append(FeaturePlan(modality, spec, weights_identity(spec)))
        elif modality == "audio":
            plans.append(FeaturePlan(modality, None, None))
    return plans


# --------------------------------------------------------------------------- reading

class FeatureSet:
    """Read side of one feature set: the memory-mapped values and, for speech, the row index."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.values: np.ndarray = np.load(path / VALUES, mmap_mode="r")
        self.offsets: np.ndarray | None = None
        self.lengths: np.ndarray | None = None
        if (path / INDEX).is_file():
            with np.load(path / INDEX) as index:
                self.offsets, self.lengths = index["offsets"], index["lengths"]

    @property
    def modality(self) -> str:
        return self.manifest["params"]["modality"]

    @property
    def kind(self) -> str:
        """`features` (backbone output) or `waveform` (16 kHz PCM)."""
        return self.manifest["params"]["kind"]

    @staticmethod
    def open(path: Path, params: dict[str, Any], cache: PreparedCache) -> FeatureSet | None:
        """The set at `path` when it is complete and was built with `params`, else None."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if manifest.get("params") != params or not (path / VALUES).is_file():
            return None
        rows = cache.n_images if params["modality"] == "image" else cache.n_captions
        if manifest.get("rows") != rows or (params["modality"] == "audio"
                                            and not (path / INDEX).is_file()):
            return None
        return FeatureSet(path, manifest)

    def padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Speech rows zero-padded to the longest: values (B, T, *per-frame shape), lengths (B,)."""
        lengths = self.lengths[rows].astype(np.int64)
        width = max(1, int(lengths.max(initial=0)))
        out = np.zeros((len(rows), width, *self.values.shape[1:]), dtype=self.values.dtype)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            if n:
                off = int(self.offsets[row])
                out[i, :n] = self.values[off:off + n]
        return out, lengths


# --------------------------------------------------------------------------- building

def decode_clips_chunk(items: list[tuple[int, Path]],
                       cfg: DataConfig) -> list[tuple[int, np.ndarray | None, str | None]]:
    """(caption row, float32 clip or None, reason or None) per wav, as a backbone hears it."""
    out: list[tuple[int, np.ndarray | None, str | None]] = []
    for row, path in items:
        try:
            out.append((row, load_clip(path, cfg), None))
        except BadInput as exc:
            out.append((row, None, str(exc)))
    return out


class _FlatWriter:
    """Appends variable-length (T, ...) arrays to one .npy file, recording offsets and lengths."""

    def __init__(self, path: Path, tail: tuple[int, ...], dtype: Any, n_rows: int) -> None:
        self.path, self.tail, self.dtype = path, tail, np.dtype(dtype)
        self.offsets = np.zeros(n_rows, dtype=np.int64)
        self.lengths = np.zeros(n_rows, dtype=np.int32)
        self.total = 0
        self.fh = open(path, "wb")
        self.fh.write(npy_header((0, *tail), self.dtype))

    def __enter__(self) -> _FlatWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.fh.close()

    def add(self, row: int, values: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.offsets[row], self.lengths[row] = self.total, len(values)
        self.total += len(values)

    def finish(self, index: Path) -> None:
        """Write the final shape into the header, and the index of every row."""
        self.fh.seek(0)
        self.fh.write(npy_header((self.total, *self.tail), self.dtype))
        np.savez(index, offsets=self.offsets, lengths=self.lengths)


def _clips(cache: PreparedCache, workers: int | None) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Every spoken caption of the cache, decoded on worker processes, chunk by chunk."""
    rows = np.flatnonzero(cache.mel_lengths > 0)
    items = [(int(row), cache.wav_path(int(row))) for row in rows]
    for chunk in map_chunks(decode_clips_chunk, items, args=(cache.data_cfg,), workers=workers):
        for row, wave, reason in chunk:
            if wave is None:
                raise NlmmError(f"{cache.wav_path(row)} no longer decodes ({reason}), so the corpus "
                                f"changed after the cache was built; run `nlmm data prepare` again.")
        yield [(row, wave) for row, wave, _ in chunk]


def _batches(clips: list[tuple[int, np.ndarray]],
             budget: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Clips sorted by length, grouped while the padded batch stays within `budget` samples
    (budget 0: one clip per batch)."""
    batch: list[tuple[int, np.ndarray]] = []
    longest = 0
    for clip in sorted(clips, key=lambda item: len(item[1])):
        n = len(clip[1])
        if batch and max(longest, n) * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(clip)
        longest = max(longest, n)
    if batch:
        yield batch


def _half(features: torch.Tensor, spec: BackboneSpec) -> np.ndarray:
    half = features.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise NlmmError(f"{spec.name} layer {spec.layer} gives features beyond the float16 range, "
                        f"which the cache stores; pick another {spec.key}.layer.")
    return half.cpu().numpy()


def _loaded_backbone(spec: BackboneSpec, cache: PreparedCache, device: torch.device,
                     progress: bool) -> Backbone:
    backbone = Backbone(spec, cache.data_cfg.image_size)
    backbone.load_pretrained(progress)
    return backbone.to(device).eval()


def _image_features(cache: PreparedCache, plan: FeaturePlan, out: Path, device: torch.device,
                    bar: Progress, progress: bool) -> None:
    spec = plan.spec
    backbone = _loaded_backbone(spec, cache, device, progress)
    n, step = cache.n_images, IMAGE_BATCH.get(device.type, IMAGE_BATCH["cpu"])
    values = np.lib.format.open_memmap(out / VALUES, mode="w+", dtype=np.float16,
                                       shape=(n, backbone.shape.tokens, backbone.out_dim))
    task = bar.add_task(f"{spec.name} image features ({device.type})", total=n)
    with torch.inference_mode():
        for start in range(0, n, step):
            pixels = torch.from_numpy(np.array(cache.images[start:start + step]))
            features, _ = backbone(normalize_images(pixels.to(device)), None)
            values[start:start + len(pixels)] = _half(features, spec)
            bar.advance(task, len(pixels))
    values.flush()


def _speech_features(cache: PreparedCache, plan: FeaturePlan, out: Path, device: torch.device,
                     bar: Progress, progress: bool, workers: int | None) -> None:
    spec = plan.spec
    backbone = _loaded_backbone(spec, cache, device, progress)
    seconds = AUDIO_BATCH_SECONDS.get(device.type, AUDIO_BATCH_SECONDS["cpu"])
    budget = int(seconds * BACKBONE_SAMPLE_RATE) if backbone.pads_exactly else 0
    task = bar.add_task(f"{spec.name} speech features ({device.type})",
                        total=int((cache.mel_lengths > 0).sum()))
    with _FlatWriter(out / VALUES, (backbone.out_dim,), np.float16, cache.n_captions) as writer, \
            torch.inference_mode():
        for chunk in _clips(cache, workers):
            for batch in _batches(chunk, budget):
                lengths = torch.tensor([len(wave) for _, wave in batch])
                waves = torch.zeros(len(batch), int(lengths.max()))
                for i, (_, wave) in enumerate(batch):
                    waves[i, :len(wave)] = torch.from_numpy(wave)
                mask = torch.arange(waves.shape[1])[None, :] < lengths[:, None]
                features, frame_mask = backbone(waves.to(device), mask.to(device))
                frames = _half(features, spec)
                counts = frame_mask.sum(dim=1).tolist() if frame_mask is not None else \
                    [frames.shape[1]] * len(batch)
                for i, (row, _) in enumerate(batch):
                    writer.add(row, frames[i, :counts[i]])
                bar.advance(task, len(batch))
        writer.finish(out / INDEX)


def _waveforms(cache: PreparedCache, out: Path, bar: Progress, workers: int | None) -> None:
    task = bar.add_task("waveforms (16-bit)", total=int((cache.mel_lengths > 0).sum()))
    with _FlatWriter(out / VALUES, (), np.int16, cache.n_captions) as writer:
        for chunk in _clips(cache, workers):
            for row, wave in chunk:
                writer.add(row, np.round(np.clip(wave, -1.0, 1.0) * PCM_SCALE))
            bar.advance(task, len(chunk))
        writer.finish(out / INDEX)


def _build(cache: PreparedCache, plan: FeaturePlan, out: Path, device: torch.device,
           progress: bool, workers: int | None) -> None:
    start = time.perf_counter()
    with progress_bar(progress) as bar:
        if plan.kind == "waveform":
            _waveforms(cache, out, bar, workers)
        elif plan.modality == "image":
            _image_features(cache, plan, out, device, bar, progress)
        else:
            _speech_features(cache, plan, out, device, bar, progress, workers)
    values = np.load(out / VALUES, mmap_mode="r")
    manifest = {
        "params": plan.params(cache),
        "weights": plan.spec.weights if plan.spec is not None else None,
        "rows": cache.n_images if plan.modality == "image" else cache.n_captions,
        "shape": list(values.shape), "dtype": str(values.dtype),
        "device": str(device), "build_seconds": time.perf_counter() - start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    del values
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _prune_replaced(root: Path, plan: FeaturePlan, keep: str, cache: PreparedCache) -> None:
    """Delete the sets of the same backbone, layer and weights path built from other bytes of
    that weights file: that file is gone, so they can never be selected again."""
    if plan.spec is None:
        return
    params = plan.params(cache)
    for folder in root.iterdir():
        if folder.name == keep or not folder.is_dir():
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        other = dict(manifest.get("params", {}))
        if manifest.get("weights") == plan.spec.weights and \
                other.pop("weights_identity", None) != params["weights_identity"] and \
                other == {k: v for k, v in params.items() if k != "weights_identity"}:
            shutil.rmtree(folder, ignore_errors=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_features(cache: PreparedCache, encoders: EncodersConfig,
                    device: torch.device | str | None = None, progress: bool = True,
                    workers: int | None = None) -> PreparedCache:
    """`cache` serving the feature sets `encoders` needs, building the missing ones (on
    `device`, default the GPU when there is one). Without backbones: `cache` with none."""
    plans = plan_features(encoders)
    if not plans:
        return cache.with_features({})
    device = torch.device(device) if device is not None else default_device()
    root = cache.path / FEATURES_DIR
    root.mkdir(exist_ok=True)
    sets: dict[str, FeatureSet] = {}
    with locked(root):
        # Under the lock, any build folder is debris from a crashed prepare.
        for debris in root.glob(".tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)
        for plan in plans:
            name, params = plan.folder(cache), plan.params(cache)
            found = FeatureSet.open(root / name, params, cache)
            if found is None:
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
                try:
                    _build(cache, plan, tmp, device, progress, workers)
                    shutil.rmtree(root / name, ignore_errors=True)
                    os.rename(tmp, root / name)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                _prune_replaced(root, plan, name, cache)
                found = FeatureSet.open(root / name, params, cache)
            sets[plan.modality] = found
    return cache.with_features(sets)
