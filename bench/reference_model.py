"""A plain tri-modal dual encoder: the yardstick NL-MM is measured against (benchmark-only code).

The kind of model a practitioner would write first for this task, kept deliberately ordinary:
- image: four conv stages (3x3 conv, BatchNorm, ReLU, 2x2 max-pool; 32-64-128-256 channels),
  global average pooling, a linear projection;
- text: word-piece embeddings and one bidirectional GRU layer, mean-pooled over real tokens;
- audio: four 1-D conv stages over the log-mel frames (kernel 5, BatchNorm, ReLU, stride 2),
  mean-pooled over valid frames;
- 128-d L2-normalised embeddings, the same multi-positive InfoNCE and learnable temperature
  as NL-MM (`nlmm.model.losses`), AdamW without decay on norms and biases, no augmentation;
  its lr, β2, batch and schedule are the bench's to tune (`bench/quality_bench.py`).

It exposes `encode(modality, x, mask)` like `NLMM`, so nlmm's own evaluation scores it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlmm.model.losses import INIT_LOGIT_SCALE, ContrastiveLoss, ForwardOutput, logit_scale_value

# Every pair weighted alike: the reference has no tuned loss weights.
REFERENCE_LOSS = ContrastiveLoss({"i2t": 1.0, "i2a": 1.0, "t2a": 1.0})


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, C) -> (B, C) mean over the valid positions."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class ImageTower(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128, 256):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(channels, dim)

    def forward(self, image: Tensor, mask: Tensor | None) -> Tensor:
        return self.proj(self.features(image).mean(dim=(2, 3)))


class TextTower(nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        mask = ids != 0 if mask is None else mask.bool()
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return self.proj(_masked_mean(out, mask))


class AudioTower(nn.Module):
    def __init__(self, n_mels: int, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        channels = n_mels
        for width in (128, 128, 256, 256):
            self.convs.append(nn.Conv1d(channels, width, 5, stride=2, padding=2, bias=False))
            self.norms.append(nn.BatchNorm1d(width))
            channels = width
        self.proj = nn.Linear(channels, dim)

    def forward(self, mel: Tensor, mask: Tensor | None) -> Tensor:
        x = mel[:, 0]
        for conv, norm in zip(self.convs, self.norms):
            if mask is not None:
                x = x * mask[:, None, :].to(x.dtype)
            x = F.relu(norm(conv(x)))
            if mask is not None:
                mask = mask[:, ::2]
        return self.proj(_masked_mean(x.transpose(1, 2), mask))


class ReferenceEncoder(nn.Module):
    def __init__(self, vocab_size: int, n_mels: int, dim: int = 128) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({"image": ImageTower(dim), "text": TextTower(vocab_size, dim),
                                     "audio": AudioTower(n_mels, dim)})
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def encode(self, modality: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return F.normalize(self.towers[modality](x, mask).float(), dim=-1)

    def forward(self, batch: dict[str, Tensor]) -> ForwardOutput:
        """The embeddings `REFERENCE_LOSS` scores (audio only on the rows that have it)."""
        rows = batch["has_audio"].bool()
        emb = {"image": self.encode("image", batch["image"]),
               "text": self.encode("text", batch["text"], batch["text_mask"]),
               "audio": self.encode("audio", batch["audio"][rows], batch["audio_mask"][rows])}
        return ForwardOutput(emb, batch["image_ids"], rows, logit_scale_value(self.logit_scale))

    def optimizer(self, lr: float = 1e-3, weight_decay: float = 0.01,
                  betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
        """AdamW; matrices and conv kernels decay, norms, biases and the temperature do not."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas)
