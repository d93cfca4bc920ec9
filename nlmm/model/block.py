"""The NL block: token mixer, shared-memory read, then the CMS chain, all pre-norm residual."""

from __future__ import annotations

from torch import Tensor, nn

from nlmm.config import Config
from nlmm.model.cms import ContinuumMemory
from nlmm.model.layers import SelfAttention
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
        self.cms = ContinuumMemory(cfg.cms_levels, d, cfg.ffn_mult, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, slots: Tensor | None,
                probe: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, L, d) -> (B, L, d), plus the memory-read entropy per token when `probe`."""
        x = x + self.drop(self.mixer(self.mixer_norm(x), mask))
        entropy = None
        if self.memory is not None:
            read, entropy = self.memory(self.memory_norm(x), slots, probe)
            x = x + self.drop(read)
        return self.cms(x), entropy
