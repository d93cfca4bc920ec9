"""Texts, image files and speech files as a model's input, and their embeddings: the one path
by which `nlmm search` embeds a query and a bundle (`nlmm.load_bundle`) embeds anything.

Files are decoded by `nlmm.data.features`, the functions the data cache decodes the training
files with, and texts are tokenized as the cache tokenizes captions, so a file or a caption
embeds as its cached copy does. A batch is padded and masked as the loader pads cached items
(`nlmm.data.loader`), so batching changes no embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nlmm.config import Config
from nlmm.data.features import BadInput, load_clip, load_image, load_wav, log_mel, normalize_images
from nlmm.data.tokenizer import TextTokenizer
from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from nlmm.model import NLMM


def text_input(texts: Sequence[str], cfg: Config, tokenizer: TextTokenizer,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, L), cut to the longest text (at most data.text_max_len tokens), and the
    mask of real tokens."""
    ids, lengths = tokenizer.encode_batch(list(texts), cfg.data.text_max_len)
    width = max(1, int(lengths.max(initial=0)))
    x = torch.as_tensor(ids[:, :width], dtype=torch.long, device=device)
    mask = torch.as_tensor(np.arange(width)[None, :] < lengths[:, None], device=device)
    return x, mask


def file_input(modality: str, paths: Sequence[Path], cfg: Config, device: torch.device,
               noun: str = "query") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image files as normalised pixels (N, 3, S, S) with no mask; speech files as log-mels
    (N, 1, n_mels, T), or for a speech backbone as waveforms (N, samples), zero-padded to the
    longest with the mask of real frames. A file that cannot be decoded is an NlmmError naming
    it as a `noun` file."""
    decoded = [_decode(modality, Path(p), cfg, noun) for p in paths]
    if modality == "image":
        return normalize_images(torch.as_tensor(np.stack(decoded)).to(device)), None
    lengths = np.array([a.shape[-1] for a in decoded])
    out = np.zeros((len(decoded), *decoded[0].shape[:-1], int(lengths.max())), dtype=np.float32)
    for row, item in zip(out, decoded, strict=True):
        row[..., :item.shape[-1]] = item
    x = torch.as_tensor(out, device=device)
    mask = torch.as_tensor(np.arange(out.shape[-1])[None, :] < lengths[:, None], device=device)
    return (x if x.dim() == 2 else x[:, None]), mask


def _decode(modality: str, path: Path, cfg: Config, noun: str) -> np.ndarray:
    try:
        if modality == "image":
            return load_image(path, cfg.data.image_size)
        if cfg.encoders.backbone("audio") is not None:
            # a speech backbone hears the waveform, cut as in the feature cache
            return load_clip(path, cfg.data)
        # the cache stores log-mels as float16: the same rounding here
        return log_mel(load_wav(path, cfg.data.sample_rate), cfg.data).astype(np.float32)
    except BadInput as exc:
        raise NlmmError(f"cannot read {noun} file {path}: {exc}.") from None


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast the model was evaluated with (none on a CPU)."""
    amp = cfg.precision.amp
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def embed_input(model: NLMM, modality: str, x: torch.Tensor, mask: torch.Tensor | None, *,
                ttt: bool, mask_id: int) -> torch.Tensor:
    """(N, d) unit float32 embeddings of model input; `ttt` adapts the model to each row alone
    first (test-time training, text masked with `mask_id`, the tokenizer's [MASK] id)."""
    with autocast_for(model.cfg, x.device):
        if ttt:
            emb = model.encode_ttt(modality, x, mask, mask_id=mask_id).detach()
        else:
            with torch.no_grad():
                emb = model.encode(modality, x, mask)
    return emb.float()
