"""Test-time training: low-rank adapters adapted on a self-supervised loss of the query alone.

Each block's mixer output projection carries a `LowRankAdapter` (`up` zero, so adaptation
starts at the trained model); `adapt_and_encode` adapts a private copy per query row with plain
SGD on masked-token prediction (text) or masked-patch/frame reconstruction (image, audio), the
objective `ssl_task` builds, which training also optimises when `ttt.aux_weight > 0`. Why `up`
stays zero, the joint training and the masking rule: bench/DESIGN.md, "Test-time training".
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

MASK_TOKEN_ID = 3  # [MASK]: fourth of nlmm.data.tokenizer.SPECIAL_TOKENS (test_model_ttt checks the tie)
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
        # zero, so an adaptation starts at the trained model (see the module docstring)
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

    A position's score is frac((p + 1) * golden ratio), a well-spread sequence that does not
    depend on the sequence length, so a row's choice depends on its own valid positions only.
    The sequence starts at p + 1 because frac(0) = 0 would put position 0 (a caption's first
    word, nearly always "a"; the first audio frame, often silence) first in every row.
    """
    n, length = valid.shape
    score = torch.frac(torch.arange(1, length + 1, dtype=torch.float64) * _GOLDEN).to(valid.device)
    score = score.expand(n, length).masked_fill(~valid, 2.0)
    rank = score.argsort(dim=1).argsort(dim=1)
    count = (valid.sum(dim=1) * ratio).round().clamp(min=1)
    return rank < count[:, None]


def _per_row_mean(values: Tensor, where: Tensor) -> Tensor:
    """Mean of `values` (one per True entry of `where`, row-major order) within each row."""
    rows = where.nonzero()[:, 0]
    total = torch.zeros(where.shape[0], dtype=values.dtype, device=values.device)
    return total.index_add(0, rows, values) / where.sum(dim=1).clamp(min=1)


@dataclass
class SSLTask:
    """The self-supervised objective of one batch of queries of one modality.

    `corrupted` goes through `Encoder.trunk` (with `token_mask`); `loss_per_row(states)` scores
    the resulting (N, L, d) states, one loss per row. `clean` is the uncorrupted stem output.
    """

    encoder: Encoder
    modality: str
    clean: Tensor  # (N, L, d) stem output
    corrupted: Tensor  # (N, L, d) trunk input with the selected positions corrupted
    token_mask: Tensor | None  # (N, L) valid tokens, None = all valid
    selected: Tensor  # (N, L) bool, the corrupted positions
    targets: Tensor  # text: (S,) token ids; image/audio: (S, d) stem outputs (detached)

    def loss_per_row(self, states: Tensor) -> Tensor:
        """(N,) mean loss over each row's selected positions, in fp32."""
        picked = states[self.selected]
        if self.modality == "text":
            # Tied head: the masked position's state scores every token embedding, scaled by
            # 1/sqrt(d). The states are layer-normalised (norm about sqrt(d)) and the embeddings
            # unit-scale, so raw products have a std of about sqrt(d): tens of nats of initial
            # cross-entropy, whose gradient would swamp the contrastive one in joint training.
            weight = self.encoder.stem.tokens.weight
            logits = (picked.float() @ weight.float().T) * weight.shape[1] ** -0.5
            per_token = F.cross_entropy(logits, self.targets, reduction="none")
        else:
            d = picked.shape[-1]
            pred = F.layer_norm(picked.float(), (d,))
            target = F.layer_norm(self.targets.float(), (d,))
            per_token = (pred - target).pow(2).mean(dim=-1)
        return _per_row_mean(per_token, self.selected)


def ssl_task(encoder: Encoder, modality: str, x: Tensor, mask: Tensor | None, *,
             mask_id: int = MASK_TOKEN_ID,
             tokens: tuple[Tensor, Tensor | None] | None = None) -> SSLTask:
    """Corrupt a batch as the self-supervised objective of `modality` asks and return the task.

    `x` and `mask` as `Encoder.tokens` takes them (checked by the caller); `tokens`, when
    given, is the `encoder.tokens(x, mask)` the caller already computed (training reuses the
    stem output of the contrastive pass, so the stem runs once). Runs under the caller's grad
    mode: with gradients on (training), the stem gets gradient through the visible tokens.
    """
    clean, token_mask = encoder.tokens(x, mask) if tokens is None else tokens
    valid = token_mask if token_mask is not None else \
        torch.ones(clean.shape[:2], dtype=torch.bool, device=clean.device)
    selected = masked_positions(valid, TEXT_MASK_RATIO if modality == "text" else MASK_RATIO)
    if modality == "text":
        corrupted, _ = encoder.tokens(x.masked_fill(selected, mask_id), mask)
        targets = x[selected]
    else:
        corrupted = clean.masked_fill(selected[..., None], 0.0)
        # The target is the stem's own output, so it is detached: were the gradient to flow
        # into it, the cheapest way for joint training to lower the loss would be a stem whose
        # output is trivially predictable (e.g. the same vector at every position), which
        # costs the contrastive towers their input. With the target fixed, the loss can only
        # fall by the trunk predicting the stem's features from the visible context.
        targets = clean[selected].detach()
    return SSLTask(encoder, modality, clean, corrupted, token_mask, selected, targets)


def ssl_loss(model: NLMM, modality: str, x: Tensor, mask: Tensor | None, *,
             mask_id: int = MASK_TOKEN_ID,
             tokens: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    """The auxiliary training loss: the mean over rows of the per-row self-supervised loss that
    `adapt_and_encode` minimises, through the trunk as it stands (no adapters installed)."""
    encoder: Encoder = model.encoders[modality]
    task = ssl_task(encoder, modality, x, mask, mask_id=mask_id, tokens=tokens)
    states, _ = encoder.trunk(task.corrupted, task.token_mask, model.memory_slots())
    return task.loss_per_row(states).mean()


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
        task = ssl_task(encoder, modality, x, mask, mask_id=mask_id)

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
                    states, _ = encoder.trunk(task.corrupted, task.token_mask, slots)
                    per_row = task.loss_per_row(states)
                    grads = torch.autograd.grad(per_row.sum(), leaves)
                    losses.append(per_row.mean().item())
                    updated = [(t - eta * g).detach() for t, g in zip(leaves, grads)]
                    copies = list(zip(updated[0::2], updated[1::2]))
        for adapter, pair in zip(adapters, copies):
            adapter.rows = pair
        with torch.no_grad():
            states, _ = encoder.trunk(task.clean, task.token_mask, slots)
            embeddings = encoder.embed(states, task.token_mask)
    finally:
        for adapter in adapters:
            adapter.rows = None
    return AdaptationResult(embeddings, losses, [(d.detach(), u.detach()) for d, u in copies])
