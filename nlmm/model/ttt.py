"""Test-time training: low-rank adapters adapted on a self-supervised loss of the query alone.

Every encoder block's mixer output projection carries a `LowRankAdapter` (`up @ down`, rank
`ttt.adapter_rank`). Its stored parameters are the starting point of every adaptation: `down`
random, `up` zero, so the adapted model starts as the trained model. They are not trained by
the outer optimiser (requires_grad=False) and are never written by an adaptation.

`adapt_and_encode` adapts one private copy of the adapters PER QUERY ROW: the copies carry a
batch dimension and the loss is the sum of per-row losses, so one batched backward pass gives
every row its own gradient. A query's adapted weights and embedding therefore depend on that
query only — not on the other queries in the batch, their order, or any pairing label (none is
passed in). Steps are plain SGD (`ttt.max_steps` steps of size `ttt.eta`) on:
- text: masked-token prediction — TEXT_MASK_RATIO of the valid tokens replaced by the
  tokenizer's [MASK] id, predicted by a head tied to the token embeddings;
- image / audio: masked-patch / masked-frame reconstruction — MASK_RATIO of the valid tokens
  zeroed after the stem, and the final state at each masked position regresses the stem output
  it replaced (both layer-normalised). The stem is a fixed linear map (image) or convolution
  stack (audio) of the pixels / mel frames, so no untrained decoder head is needed.
Masked positions are the same at every step (the objective is one fixed function being
minimised) and are chosen deterministically per row (low-discrepancy scores of the positions,
lowest ranks among the row's valid tokens), so results are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from nlmm.model.encoders import Encoder
    from nlmm.model.nlmm import NLMM

MASK_TOKEN_ID = 3  # [MASK] in nlmm.data.tokenizer's special tokens ([PAD], [UNK], [CLS], [MASK])
TEXT_MASK_RATIO = 0.15
MASK_RATIO = 0.25
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class LowRankAdapter(nn.Module):
    """Adds `up @ down @ x` to a projection's output while per-row copies are installed."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        down = torch.empty(rank, d_in)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # the LoRA initialisation of A
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(torch.zeros(d_out, rank), requires_grad=False)
        self.rows: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """`y` is the base projection of `x` (N, L, d_in); the stored `up` is zero, so without
        installed copies the adapter is the identity and costs nothing."""
        if self.rows is None:
            return y
        down, up = self.rows
        hidden = torch.bmm(x, down.transpose(1, 2).to(x.dtype))
        return y + torch.bmm(hidden, up.transpose(1, 2).to(x.dtype))


@dataclass
class AdaptationResult:
    embeddings: Tensor  # (N, embed_dim) L2-normalised, from the adapted encoder
    losses: list[float]  # mean self-supervised loss over rows, before each step
    adapted: list[tuple[Tensor, Tensor]]  # per adapter: (down, up) per row, (N, r, d_in), (N, d_out, r)


def masked_positions(valid: Tensor, ratio: float) -> Tensor:
    """(N, L) bool: round(ratio * n_valid) (at least one) valid positions per row.

    A position's score is frac(p * golden ratio), a well-spread sequence that does not depend
    on the sequence length, so a row's choice depends on its own valid positions only.
    """
    n, length = valid.shape
    score = torch.frac(torch.arange(length, dtype=torch.float64) * _GOLDEN).to(valid.device)
    score = score.expand(n, length).masked_fill(~valid, 2.0)
    rank = score.argsort(dim=1).argsort(dim=1)
    count = (valid.sum(dim=1) * ratio).round().clamp(min=1)
    return rank < count[:, None]


def _per_row_mean(values: Tensor, where: Tensor) -> Tensor:
    """Mean of `values` (one per True entry of `where`, row-major order) within each row."""
    rows = where.nonzero()[:, 0]
    total = torch.zeros(where.shape[0], dtype=values.dtype, device=values.device)
    return total.index_add(0, rows, values) / where.sum(dim=1).clamp(min=1)


def adapt_and_encode(model: NLMM, modality: str, x: Tensor, mask: Tensor | None, *,
                     steps: int, eta: float, mask_id: int = MASK_TOKEN_ID) -> AdaptationResult:
    """Adapt per-row adapter copies on the query's own self-supervised loss, then embed it.

    `x` as for `NLMM.encode`, `mask` a boolean (B, L) text / (B, T) audio mask, None for images
    (`NLMM.encode_ttt` validates both and calls this). Gradients are enabled inside even when
    the caller runs under `torch.no_grad()`; only the adapter copies are differentiated, so no
    `.grad` of the model is touched and the model is left unchanged.
    """
    if torch.is_inference_mode_enabled():
        raise NlmmError("test-time adaptation needs autograd; call it under torch.no_grad() "
                        "instead of torch.inference_mode().")
    encoder: Encoder = model.encoders[modality]
    adapters = [block.mixer.adapter for block in encoder.blocks]
    slots = model.memory_slots()
    n = x.shape[0]

    with torch.no_grad():
        clean, token_mask = encoder.tokens(x, mask)
        valid = token_mask if token_mask is not None else \
            torch.ones(clean.shape[:2], dtype=torch.bool, device=clean.device)
        selected = masked_positions(valid, TEXT_MASK_RATIO if modality == "text" else MASK_RATIO)
        if modality == "text":
            corrupted, _ = encoder.tokens(x.masked_fill(selected, mask_id), mask)
        else:
            corrupted = clean.masked_fill(selected[..., None], 0.0)

    def ssl_loss_per_row(states: Tensor) -> Tensor:
        picked = states[selected]
        if modality == "text":
            logits = picked.float() @ encoder.stem.tokens.weight.float().T
            per_token = F.cross_entropy(logits, x[selected], reduction="none")
        else:
            d = picked.shape[-1]
            pred = F.layer_norm(picked.float(), (d,))
            target = F.layer_norm(clean[selected].float(), (d,))
            per_token = (pred - target).pow(2).mean(dim=-1)
        return _per_row_mean(per_token, selected)

    copies = [(a.down.detach().expand(n, -1, -1).clone(), a.up.detach().expand(n, -1, -1).clone())
              for a in adapters]
    losses: list[float] = []
    try:
        if adapters:
            with torch.enable_grad():
                for _ in range(steps):
                    leaves = [t.requires_grad_(True) for pair in copies for t in pair]
                    for adapter, pair in zip(adapters, copies):
                        adapter.rows = pair
                    states, _ = encoder.trunk(corrupted, token_mask, slots)
                    per_row = ssl_loss_per_row(states)
                    grads = torch.autograd.grad(per_row.sum(), leaves)
                    losses.append(per_row.mean().item())
                    updated = [(t - eta * g).detach() for t, g in zip(leaves, grads)]
                    copies = list(zip(updated[0::2], updated[1::2]))
        for adapter, pair in zip(adapters, copies):
            adapter.rows = pair
        with torch.no_grad():
            states, _ = encoder.trunk(clean, token_mask, slots)
            embeddings = encoder.embed(states, token_mask)
    finally:
        for adapter in adapters:
            adapter.rows = None
    return AdaptationResult(embeddings, losses, [(d.detach(), u.detach()) for d, u in copies])
