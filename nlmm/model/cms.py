"""Continuum Memory System (Nested Learning, Eq. 30-31): a chain of MLP levels.

`y = MLP^(f_k)( ... MLP^(f_1)(x))`, one level per `cms_levels` entry in the order listed
(fast -> slow). Each level is a pre-norm residual MLP; its parameters (norm included) form the
level's parameter group, which the level optimizer updates every `chunk_size` global steps
by the sum of the chunk's per-step updates (`nlmm.optim.levels`). The model itself is an
ordinary chain: the multi-frequency behaviour lives entirely in how the groups are stepped.
`level_gain_means` reports how far each level's LayerScale gain has opened its branch.
"""

from __future__ import annotations

import torch
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


def level_gain_means(model: nn.Module) -> dict[str, float]:
    """Mean |gain| of each CMS level's LayerScale gains over every ContinuumMemory in `model`
    (all encoders and blocks, weighted by channel): how far the level's branch is switched on
    (0 at the default init). Levels without gains (`layer_scale_init: null`) are left out. One
    host sync; metrics `level/<name>/gain`."""
    sums: dict[str, list[Tensor]] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ContinuumMemory):
                for name, level in zip(module.names, module.levels):
                    gain = level.scale.gain
                    if gain is not None:
                        sums.setdefault(name, []).append(gain.detach().abs().float().sum())
                        counts[name] = counts.get(name, 0) + gain.numel()
        if not sums:
            return {}
        totals = torch.stack([torch.stack(parts).sum() for parts in sums.values()]).tolist()
    return {name: total / counts[name] for name, total in zip(sums, totals)}
