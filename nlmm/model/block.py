"""The NL block: token mixer, shared-memory read, then the CMS chain, all pre-norm residual.

Every residual branch ends in a LayerScale gain (`layer_scale_init`, 0 by default), so a fresh
encoder is its stem, pooling and head alone and each branch joins as training finds it useful.
Why the gains start at 0 (measured): bench/DESIGN.md, "NL block gains".
"""

from __future__ import annotations

from torch import Tensor, nn

from nlmm.config import Config
from nlmm.model.cms import ContinuumMemory
from nlmm.model.layers import LayerScale, SelfAttention
from nlmm.model.memory import MemoryRead


class NLBlock(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        d = cfg.d_model
        self.mixer_norm = nn.LayerNorm(d)
        self.mixer = SelfAttention(d, cfg.n_heads, cfg.mixer, cfg.linear_chunk,
                                   cfg.ttt.adapter_rank, cfg.dropout)
        self.memory_norm = nn.LayerNorm(d) if cfg.L_mem > 0 else None
        self.memory = MemoryRead(d, cfg.n_heads, cfg.dropout) if cfg.L_mem > 0 else None
        self.cms = ContinuumMemory(cfg.cms_levels, d, cfg.ffn_mult, cfg.dropout, cfg.layer_scale_init)
        self.drop = nn.Dropout(cfg.dropout)
        self.mixer_scale = LayerScale(d, cfg.layer_scale_init)
        self.memory_scale = LayerScale(d, cfg.layer_scale_init) if cfg.L_mem > 0 else None

    def forward(self, x: Tensor, mask: Tensor | None, slots: Tensor | None,
                probe: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, L, d) -> (B, L, d), plus the memory-read entropy per token when `probe`."""
        x = x + self.mixer_scale(self.drop(self.mixer(self.mixer_norm(x), mask)))
        entropy = None
        if self.memory is not None:
            read, entropy = self.memory(self.memory_norm(x), slots, probe)
            x = x + self.memory_scale(self.drop(read))
        return self.cms(x), entropy
