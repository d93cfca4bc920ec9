"""Optimizers of the CMS levels and the `LevelOptimizer` that steps each at its own frequency."""

from nlmm.optim.anderson import UniversalAnderson
from nlmm.optim.dmgd import DMGD
from nlmm.optim.factory import SGDW, build_optimizer
from nlmm.optim.levels import Level, LevelOptimizer, LevelSetting, level_settings
from nlmm.optim.muon import Muon, exclude_from_muon, newton_schulz

__all__ = ["DMGD", "SGDW", "Level", "LevelOptimizer", "LevelSetting", "Muon", "UniversalAnderson",
           "build_optimizer", "exclude_from_muon", "level_settings", "newton_schulz"]
