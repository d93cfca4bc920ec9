"""The per-level optimizers of the CMS levels, each stepped at its own frequency, with per-level
clipping and fp16 loss scaling (`LevelOptimizer`; not an lr scheduler: warmup and decay come
from the training loop through `set_lr_factor`).

Continuum Memory System rule (Nested Learning, Eq. 31): the parameters of level ℓ change only
when the global step i ≡ 0 (mod C_ℓ), and then by the update of the SUM of the gradients over
the C_ℓ steps of the chunk. The training loop, once per optimizer step:

    loss = optimizer.scale_loss(loss)          # × loss scale under fp16, unchanged otherwise
    loss.backward()                            # as many micro-batches as it likes: .grad sums them
    stepped = optimizer.step_all(global_step)  # 1-based count of optimizer steps, across epochs

`global_step` numbers optimizer steps over the whole run, never the batch index in an epoch, so
the levels keep their rhythm across epoch boundaries and resumes.

step_all: unscale this step's fresh gradients exactly once (fp16) and check them (always); a
non-finite value skips the step for every level: the fresh gradients are dropped, accumulated
chunk sums are left as they were, the fp16 loss scale halves and [] is returned
(`last_step_skipped` is then True; a loop that wants every chunk to sum exactly C_ℓ gradients
should call the next step with the same `global_step`). Otherwise each level with C_ℓ > 1 adds
the fresh gradients to its chunk sum; each level due at this step gets the chunk sum (or, for
C_ℓ = 1, the fresh gradient) in `.grad`, has its norm clipped to `grad_clip` (per level, on the
unscaled gradient), and steps its optimizer. Every `.grad` is None afterwards. bf16 and fp32 use no loss scale.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from nlmm.config import CMSLevel, Config
from nlmm.errors import NlmmError
from nlmm.optim.factory import build_optimizer

AMP_MODES = ("none", "bf16", "fp16")
_STATE_VERSION = 1


# Optimizers whose step size does not grow with the gradient: given a chunk's summed gradient
# they move a level about as far as one fast step, so a level stepped every C steps drifts C
# times slower than the fast level unless its lr is scaled (`cms_lr_scaling`).
SCALE_INVARIANT = ("adamw", "muon", "universal_anderson")


def chunk_lr_scale(chunk_size: int, optimizer: str, rule: str) -> float:
    """The factor `cms_lr_scaling` applies to a level's lr: Nested Learning's chunk rule
    θ ← θ − Σ_chunk η∇ moves a level by the sum of C per-step updates, which for a normalised
    step is C·η when the gradients agree ("chunk") and √C·η when they are noise ("sqrt")."""
    if rule == "none" or optimizer not in SCALE_INVARIANT:
        return 1.0
    return float(chunk_size) if rule == "chunk" else chunk_size ** 0.5


@dataclass(frozen=True)
class LevelSetting:
    """What one level trains with once the run-wide options are applied."""

    name: str
    chunk_size: int
    optimizer: str
    lr: float  # before warmup and decay
    weight_decay: float


def level_settings(cfg: Config, extra_levels: Sequence[CMSLevel] = ()) -> list[LevelSetting]:
    """The optimizer and lr of every CMS level of `cfg`, then of every `extra_levels` entry: what
    the level optimizer builds, and what reports show as a run's levels.

    `cfg.train.optimizer`, when set, replaces every level's optimizer; `cfg.train.lr`, when set,
    becomes the lr of the fastest CMS level (smallest chunk_size, the first listed on a tie) and
    every other level keeps its ratio to it; `cfg.cms_lr_scaling` then scales each level's lr
    by its chunk (`chunk_lr_scale`).
    """
    fastest = min(cfg.cms_levels, key=lambda spec: spec.chunk_size)
    factor = 1.0
    if cfg.train.lr is not None:
        if fastest.lr == 0:
            raise NlmmError(f"train.lr cannot rescale the levels because the fastest level "
                            f"{fastest.name!r} has lr 0; give it a positive lr in cms_levels.")
        factor = cfg.train.lr / fastest.lr
    settings = []
    for spec in [*cfg.cms_levels, *extra_levels]:
        name = cfg.train.optimizer or spec.optimizer
        lr = spec.lr * factor * chunk_lr_scale(spec.chunk_size, name, cfg.cms_lr_scaling)
        settings.append(LevelSetting(spec.name, spec.chunk_size, name, lr, spec.weight_decay))
    return settings


@dataclass
class Level:
    """One CMS level: its name, update period in global steps, and the optimizer of its parameters."""

    name: str
    chunk_size: int
    optimizer: torch.optim.Optimizer

    @property
    def params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


class LevelOptimizer:
    """Steps each CMS level's optimizer at its own frequency (see the module docstring)."""

    def __init__(self, levels: Sequence[Level], amp: str = "none", grad_clip: float = 0.0,
                 init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        if amp not in AMP_MODES:
            raise NlmmError(f"precision.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}.")
        names = [lvl.name for lvl in levels]
        if len(set(names)) != len(names):
            raise NlmmError(f"level names must be unique, got {names}; rename the repeated level.")
        for lvl in levels:
            if lvl.chunk_size < 1:
                raise NlmmError(f"level {lvl.name!r} has chunk_size {lvl.chunk_size}; use 1 or more.")
        owner: dict[int, str] = {}
        for lvl in levels:
            for p in lvl.params:
                if id(p) in owner and owner[id(p)] != lvl.name:
                    raise NlmmError(f"a parameter of shape {tuple(p.shape)} belongs to both level "
                                    f"{owner[id(p)]!r} and level {lvl.name!r}; assign it to one.")
                owner[id(p)] = lvl.name
        self._levels = list(levels)
        self._params = [lvl.params for lvl in self._levels]
        self._accum: list[list[Tensor | None]] = [[None] * len(ps) for ps in self._params]
        self._base_lrs = [[g["lr"] for g in lvl.optimizer.param_groups] for lvl in self._levels]
        self._lr_factor = 1.0
        self._grad_clip = grad_clip
        self._scaling = amp == "fp16"
        self._scale = init_scale if self._scaling else 1.0
        self._growth_interval = growth_interval
        self._good_steps = 0
        self._grad_norms: dict[str, Tensor] = {}
        self.last_step_skipped = False

    @classmethod
    def from_config(cls, level_params: dict[str, list[Parameter]], cfg: Config,
                    extra_levels: Sequence[CMSLevel] = (),
                    no_decay: Collection[Parameter] = ()) -> LevelOptimizer:
        """One optimizer per CMS level of `cfg` (then per `extra_levels` entry, e.g. a
        fine-tuned backbone) over that level's parameters, set up as `level_settings` says.

        Levels without trainable parameters are left out; the parameters in `no_decay` take no
        weight decay. Loss scaling and clipping come from `cfg.precision`.
        """
        all_specs = [*cfg.cms_levels, *extra_levels]
        specs = {spec.name: spec for spec in all_specs}
        if len(specs) != len(all_specs):
            raise NlmmError(f"level names must be unique, got {[s.name for s in all_specs]}; "
                            f"rename the repeated level.")
        unknown = sorted(set(level_params) - set(specs))
        if unknown:
            raise NlmmError(f"parameters were assigned to level {unknown[0]!r}, which cms_levels "
                            f"does not define; use one of: {', '.join(specs)}.")
        levels = []
        for setting in level_settings(cfg, extra_levels):
            params = [p for p in level_params.get(setting.name, []) if p.requires_grad]
            if not params:
                continue
            optimizer = build_optimizer(setting.optimizer, params, setting.lr,
                                        setting.weight_decay, no_decay)
            levels.append(Level(setting.name, setting.chunk_size, optimizer))
        if not levels:
            raise NlmmError("no CMS level has trainable parameters; check that the model assigns "
                            "its parameters to the levels named in cms_levels.")
        return cls(levels, amp=cfg.precision.amp, grad_clip=cfg.precision.grad_clip)

    # ------------------------------------------------------------------ introspection

    @property
    def levels(self) -> list[Level]:
        return list(self._levels)

    @property
    def loss_scale(self) -> float:
        return self._scale

    @property
    def grad_norms(self) -> dict[str, Tensor]:
        """Pre-clip gradient norm of each level at its last step (only while grad_clip > 0)."""
        return dict(self._grad_norms)

    def lrs(self) -> dict[str, float]:
        return {lvl.name: lvl.optimizer.param_groups[0]["lr"] for lvl in self._levels}

    def set_lr_factor(self, factor: float) -> None:
        """Set every level's lr to its base lr × factor (warmup and decay drive this)."""
        self._lr_factor = factor
        for lvl, base_lrs in zip(self._levels, self._base_lrs):
            for group, base in zip(lvl.optimizer.param_groups, base_lrs):
                group["lr"] = base * factor

    # ------------------------------------------------------------------ stepping

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self._scale if self._scaling else loss

    def zero_grad(self) -> None:
        """Drop the fresh gradients (the chunk sums are kept: they are mid-chunk state)."""
        for params in self._params:
            for p in params:
                p.grad = None

    def step_all(self, global_step: int) -> list[str]:
        """Take optimizer step `global_step` (1-based, global); return the names of the levels stepped."""
        if global_step < 1:
            raise NlmmError(f"global_step must count optimizer steps from 1, got {global_step}.")
        self.last_step_skipped = False
        if not self._unscale_fresh_grads():
            self.zero_grad()
            if self._scaling:
                self._scale *= 0.5
                self._good_steps = 0
            self.last_step_skipped = True
            return []
        stepped = []
        for lvl, params, accum in zip(self._levels, self._params, self._accum):
            due = global_step % lvl.chunk_size == 0
            if lvl.chunk_size > 1:
                self._accumulate(params, accum)
                if due:
                    for i, p in enumerate(params):
                        p.grad, accum[i] = accum[i], None
            if due and self._step_level(lvl, params):
                stepped.append(lvl.name)
        self.zero_grad()
        if self._scaling:
            self._good_steps += 1
            if self._good_steps >= self._growth_interval:
                self._scale *= 2.0
                self._good_steps = 0
        return stepped

    def _step_level(self, lvl: Level, params: list[Tensor]) -> bool:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return False
        if self._grad_clip > 0:
            self._grad_norms[lvl.name] = torch.nn.utils.clip_grad_norm_(with_grad, self._grad_clip)
        lvl.optimizer.step()
        return True

    @staticmethod
    def _accumulate(params: list[Tensor], accum: list[Tensor | None]) -> None:
        """accum += fresh grad; the first gradient of a chunk is copied (never aliased: under
        DDP or with a persistent grad buffer, `.grad` may be storage that the next backward reuses)."""
        adding_to, adding = [], []
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if accum[i] is None:
                accum[i] = p.grad.detach().clone()
            else:
                adding_to.append(accum[i])
                adding.append(p.grad)
        if adding:
            torch._foreach_add_(adding_to, adding)

    def _unscale_fresh_grads(self) -> bool:
        """Divide the fresh grads by the loss scale (1 without fp16) in place; False if any is
        inf or nan. Checked in every precision: one non-finite gradient stepped into a level
        would turn its weights, and every later loss, into NaN.

        The step's one host sync: every dtype group of a device flags into the same tensor,
        read once (the check only sets the flag, never clears it)."""
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for params in self._params:
            for p in params:
                if p.grad is not None:
                    groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        found: dict[torch.device, Tensor] = {}
        for (device, _), grads in groups.items():
            if device not in found:
                found[device] = torch.zeros(1, device=device)
            inv_scale = torch.full((1,), 1.0 / self._scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found[device], inv_scale)
        return not any(bool(f.item()) for f in found.values())

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: optimizers, chunk sums, scale, lr factor.

        Like torch's optimizers, the tensors are the live buffers: save (or clone) the result
        before the next step_all, which adds to the chunk sums in place.
        """
        return {
            "version": _STATE_VERSION,
            "lr_factor": self._lr_factor,
            "loss_scaling": self._scaling,
            "loss_scale": self._scale,
            "good_steps": self._good_steps,
            "levels": {
                lvl.name: {
                    "chunk_size": lvl.chunk_size,
                    "optimizer_class": type(lvl.optimizer).__name__,
                    "optimizer": lvl.optimizer.state_dict(),
                    "accum": {i: a for i, a in enumerate(accum) if a is not None},
                }
                for lvl, accum in zip(self._levels, self._accum)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise NlmmError(f"the level optimizer state has version {state.get('version')!r}, this nlmm "
                            f"reads version {_STATE_VERSION}; resume with the nlmm that saved it.")
        saved, mine = sorted(state["levels"]), sorted(lvl.name for lvl in self._levels)
        if saved != mine:
            raise NlmmError(f"the checkpoint has levels {saved} but the model has {mine}; resume "
                            f"with the cms_levels the run was started with.")
        for lvl, params, accum in zip(self._levels, self._params, self._accum):
            entry = state["levels"][lvl.name]
            if entry["chunk_size"] != lvl.chunk_size:
                raise NlmmError(f"level {lvl.name!r} updated every {entry['chunk_size']} steps in the "
                                f"checkpoint but every {lvl.chunk_size} in the config; resume with "
                                f"the run's cms_levels.")
            if entry["optimizer_class"] != type(lvl.optimizer).__name__:
                raise NlmmError(f"level {lvl.name!r} was trained with {entry['optimizer_class']} but "
                                f"the config builds {type(lvl.optimizer).__name__}; resume with the "
                                f"run's optimizer.")
            try:
                lvl.optimizer.load_state_dict(entry["optimizer"])
            except ValueError as exc:
                raise NlmmError(f"the optimizer state of level {lvl.name!r} does not fit the model's "
                                f"parameters ({exc}); resume with the model the run was started with.") from None
            if any(not 0 <= i < len(params) or t.shape != params[i].shape
                   for i, t in entry["accum"].items()):
                raise NlmmError(f"the chunk sums of level {lvl.name!r} do not fit its "
                                f"{len(params)} parameters; resume with the run's model.")
            for i, p in enumerate(params):
                saved_sum = entry["accum"].get(i)
                accum[i] = None if saved_sum is None else saved_sum.to(device=p.device, dtype=p.dtype, copy=True)
        if self._scaling and state["loss_scaling"]:
            self._scale = float(state["loss_scale"])
            self._good_steps = int(state["good_steps"])
        self.set_lr_factor(float(state["lr_factor"]))
