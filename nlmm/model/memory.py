"""Shared multimodal memory: `L_mem` learned slots that every block of every encoder reads.

The slots are one parameter tensor owned by the model; each block has its own read
projections. A read is cross-attention from the block's tokens (queries) to the slots
(keys/values), scaled by 1/sqrt(head_dim) inside SDPA. Every token reads independently of the
others, so padding cannot leak into valid tokens, and the batch can be folded into the query
length: one SDPA call of (1, H, B*L, hd) queries against (1, H, L_mem, hd) slots, no
broadcast copies of the slots per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlmm.model.layers import trunc_normal


class SharedMemory(nn.Module):
    """The learned slots (L_mem, d_model) shared by the text, image and audio encoders.

    Slots start at unit scale, like the layer-normalised tokens that read them, so keys of
    slots and queries of tokens start on the same footing.
    """

    def __init__(self, n_slots: int, d_model: int) -> None:
        super().__init__()
        self.slots = nn.Parameter(trunc_normal(torch.empty(n_slots, d_model), std=1.0))


class MemoryRead(nn.Module):
    """Cross-attention from tokens to the shared slots, with an optional entropy probe."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, slots: Tensor, probe: bool = False) -> tuple[Tensor, Tensor | None]:
        """Read (B, L, d) tokens against (L_mem, d) slots.

        Returns the read (B, L, d) and, when `probe`, the detached attention entropy per token
        (B, L) in nats, averaged over heads (log L_mem = uniform reading, 0 = one slot).
        """
        b, length, d = x.shape
        h = self.n_heads
        q = self.query(x).reshape(1, b * length, h, d // h).transpose(1, 2)
        k, v = self.key_value(slots).view(-1, 2, h, d // h).permute(1, 2, 0, 3).unsqueeze(1).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, length, d)
        entropy = None
        if probe:
            with torch.no_grad():
                logp = (q.float() @ k.float().transpose(-1, -2) * (d // h) ** -0.5).log_softmax(-1)
                entropy = -(logp.exp() * logp).sum(-1).mean(dim=1).reshape(b, length)
        return self.out(y), entropy
