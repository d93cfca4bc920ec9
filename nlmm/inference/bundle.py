"""Exported bundles (`nlmm export`): load one and embed texts, image files and speech files.

A bundle is a folder of safetensors weights, the config and the tokenizer; loading it needs
only `nlmm` installed (no store, run folder or data cache):

    import nlmm
    bundle = nlmm.load_bundle("bundle/")
    text = bundle.embed_text(["a dog runs"])     # (1, embed_dim), unit rows
    images = bundle.embed_images(["photo.jpg"])  # decoded, resized and cropped as in training
    scores = text @ images.T

Files go through `nlmm.inference.embed`, the path `nlmm search` embeds its queries with, so a bundle
gives the embeddings and scores that `nlmm search` gives for the checkpoint it was exported from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from nlmm.config import Config, config_from_dict, with_legacy_defaults
from nlmm.data.tokenizer import TextTokenizer
from nlmm.inference.embed import embed_input, file_input, text_input
from nlmm.errors import NlmmError
from nlmm.model import NLMM

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.yaml", "tokenizer.json", "bundle.json"
# Items embedded per forward pass: bounds the memory of a long list of files.
BATCH_SIZE = 64

PathLike = str | os.PathLike[str]
ModelInput = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class Bundle:
    """An exported model in eval mode on `device`, with its config, tokenizer and export
    metadata (`meta`: source checkpoint, step, metrics).

    The `embed_*` methods return (N, embed_dim) float32 CPU tensors of unit rows, so the dot
    product of two rows is their cosine similarity, the score `nlmm search` ranks by. `ttt`
    adapts the model to each item first (test-time training); None does as `nlmm search`
    does: adapt when the model was trained with `ttt.enable`."""

    model: NLMM
    cfg: Config
    tokenizer: TextTokenizer
    meta: dict[str, Any]
    device: torch.device

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the model embeds: `image`, `text` and/or `audio`, each with a tower of its own."""
        return self.model.modalities

    def embed_text(self, texts: str | Sequence[str], ttt: bool | None = None) -> torch.Tensor:
        """Captions or queries, tokenized as the training captions were."""
        items = [texts] if isinstance(texts, str) else list(texts)
        return self._embed("text", items, ttt, lambda chunk: text_input(
            chunk, self.cfg, self.tokenizer, self.device))

    def embed_images(self, paths: PathLike | Sequence[PathLike],
                     ttt: bool | None = None) -> torch.Tensor:
        """Image files (any format PIL reads), decoded, resized and centre-cropped as the
        training images were."""
        return self._embed_files("image", paths, ttt)

    def embed_audio(self, paths: PathLike | Sequence[PathLike],
                    ttt: bool | None = None) -> torch.Tensor:
        """Speech files (WAV, FLAC, ... at any rate, mono or not), resampled to the model's
        rate, averaged to mono and cut to data.max_audio_seconds as the training audio was."""
        return self._embed_files("audio", paths, ttt)

    def _embed_files(self, modality: str, paths: PathLike | Sequence[PathLike],
                     ttt: bool | None) -> torch.Tensor:
        items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        return self._embed(modality, [Path(p) for p in items], ttt, lambda chunk: file_input(
            modality, chunk, self.cfg, self.device, noun=modality))

    def _embed(self, modality: str, items: list[Any], ttt: bool | None,
               to_input: Callable[[list[Any]], ModelInput]) -> torch.Tensor:
        if modality not in self.modalities:
            raise NlmmError(f"this bundle's model has no {modality} tower (it was trained on "
                            f"{' and '.join(self.modalities)} only), so it cannot embed "
                            f"{modality}; embed {' or '.join(self.modalities)} instead.")
        adapt = self.cfg.ttt.enable if ttt is None else ttt
        out = [torch.empty(0, self.cfg.embed_dim)]
        for start in range(0, len(items), BATCH_SIZE):
            x, mask = to_input(items[start:start + BATCH_SIZE])
            out.append(embed_input(self.model, modality, x, mask, ttt=adapt,
                                   mask_id=self.tokenizer.mask_id).cpu())
        return torch.cat(out)


def load_bundle(path: PathLike, device: str = "cpu") -> Bundle:
    """The bundle that `nlmm export` wrote in the folder `path`, its model on `device`
    (`cpu`, `cuda`, `cuda:1`, or `auto`: the GPU when there is one)."""
    from nlmm.devices import resolve_device
    from nlmm.inference.load import build_model

    path = Path(path)
    missing = [n for n in (WEIGHTS, CONFIG, TOKENIZER) if not (path / n).is_file()]
    if missing:
        raise NlmmError(f"{path} is not a complete nlmm bundle (missing {', '.join(missing)}); "
                        "write one with `nlmm export RUN --out DIR`.")
    dev = resolve_device(str(device))
    raw = yaml.safe_load((path / CONFIG).read_text()) or {}
    cfg = config_from_dict(with_legacy_defaults(raw), str(path / CONFIG))
    try:
        model = build_model(cfg, load_file(str(path / WEIGHTS)), dev, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise NlmmError(f"the bundle {path} does not match this version of nlmm's model "
                        f"({str(exc).splitlines()[0]}); export it again with this nlmm.") from None
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    return Bundle(model, cfg, TextTokenizer.load(path / TOKENIZER), meta, dev)
