"""Continuum Memory System (Nested Learning, Eq. 30-31): a chain of MLP levels.

`y = MLP^(f_k)( ... MLP^(f_1)(x))`, one level per `cms_levels` entry in the order listed
(fast -> slow). Each level is a pre-norm residual MLP; its parameters (norm included) form the
level's parameter group, which the level optimizer updates every `chunk_size` global steps
with the gradient accumulated over the chunk. The model itself is an ordinary chain: the
multi-frequency behaviour lives entirely in how the groups are stepped.
"""

from __future__ import annotations

from torch import Tensor, nn

from nlmm.config import CMSLevel
from nlmm.model.layers import MLP, LayerScale


class CMSLevelMLP(nn.Module):
    """One CMS level: x + γ ⊙ MLP(LayerNorm(x)), γ its LayerScale gain (in the level's group)."""

    def __init__(self, d_model: int, ffn_mult: int, dropout: float,
                 layer_scale_init: float | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ffn_mult)
        self.drop = nn.Dropout(dropout)
        self.scale = LayerScale(d_model, layer_scale_init)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale(self.drop(self.mlp(self.norm(x))))


class ContinuumMemory(nn.Module):
    """The chain of levels; `names[i]` is the cms_levels name of `levels[i]`."""

    def __init__(self, levels: list[CMSLevel], d_model: int, ffn_mult: int, dropout: float,
                 layer_scale_init: float | None = None) -> None:
        super().__init__()
        self.names = [level.name for level in levels]
        self.levels = nn.ModuleList(CMSLevelMLP(d_model, ffn_mult, dropout, layer_scale_init)
                                    for _ in levels)

    def forward(self, x: Tensor) -> Tensor:
        for level in self.levels:
            x = level(x)
        return x
