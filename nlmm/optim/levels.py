"""The per-level optimizers of the CMS levels, each stepped at its own frequency, with per-level
clipping and fp16 loss scaling (`LevelOptimizer`; not an lr scheduler: warmup and decay come
from the training loop through `set_lr_factor`).

Continuum Memory System rule (Nested Learning, Eq. 31), `cms_chunk_rule: updates`: level ℓ
changes only when the global step i ≡ 0 (mod C_ℓ), by the SUM of its optimizer's per-step
updates over the chunk, θ_{i+C} = θ_i + Σ_t u_t, each u_t from step t's clipped gradient at the
frozen θ_i. At every step each level's optimizer steps (so its moments, momentum and lr η_t
evolve per step); for C_ℓ > 1 the update is added to the open chunk sum and θ put back to θ_i.
A level thus moves as far over C steps as C steps of its optimizer would (~C·lr for Adam on
agreeing gradients; one step on the summed gradient, the rule before, `gradients`, moved ~lr).
Chosen over an lr scaling (one step at lr·√C or lr·C, `cms_lr_scaling`) by
bench/levels_bench.py on tiny_cpu: lr·C matched the sum for C = 4 but overshot it 1.8× for
C = 16 and lr·√C undershot it 2× (a chunk's coherence ‖Σu‖/mean‖u‖ was 3.8 of 4 but 10.6–14.8
of 16, varying over training), and a scaling cannot serve SGD, DMGD or Muon; the exact rule
cost 2 ms of a 147 ms step. (Universal Anderson's secant pairs within a chunk see no movement
of θ; on a small regression, chunk 8, it still trained as well as under the rule before.)

The training loop, once per optimizer step:

    loss = optimizer.scale_loss(loss)          # × loss scale under fp16, unchanged otherwise
    loss.backward()                            # as many micro-batches as it likes: .grad sums them
    stepped = optimizer.step_all(global_step)  # 1-based count of optimizer steps, across epochs

`global_step` numbers optimizer steps over the whole run, never the batch index in an epoch, so
the levels keep their rhythm across epoch boundaries and resumes.

step_all: unscale this step's fresh gradients exactly once (fp16) and check them (always); a
non-finite value skips the step for every level: the fresh gradients are dropped, the open chunk
sums and the optimizers' states are left as they were, the fp16 loss scale halves and [] is
returned (`last_step_skipped` is then True; the loop retakes the step with the same
`global_step`). Otherwise each level clips its fresh gradient to `grad_clip` (per level, per
step, on the unscaled gradient) and steps as above. Every `.grad` is None afterwards. bf16 and
fp32 use no loss scale. It returns the levels whose parameters were changed at this step.

Open chunks: a chunk still open when training ends would never be applied. `flush()` applies
every open chunk to the weights now (call it at the end of training, before the final save);
`open_chunks_applied()` does the same for the duration of a `with` block and then puts the
chunk-start weights back bit-exactly (wrap checkpoint saves and evaluations in it while
training goes on). Resume stays exact either way: the open chunk sums are in `state_dict()`,
and a state taken while the open chunks are applied also holds the chunk-start weights, which
`load_state_dict` puts back, so a resumed run continues as if no flush had happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from nlmm.config import CMSLevel, Config
from nlmm.errors import NlmmError
from nlmm.optim.factory import build_optimizer

AMP_MODES = ("none", "bf16", "fp16")
# "updates": Eq. 31 (the sum of per-step updates); "gradients": one optimizer step on the chunk's
# summed gradient, clipped as a sum (the rule before issue 24, kept for ablations).
CHUNK_RULES = ("updates", "gradients")
# 2: per-level "rule" (the meaning of "accum"), "chunk_start" while open chunks are applied.
_STATE_VERSION = 2


# Optimizers whose step size does not grow with the gradient: given a chunk's summed gradient
# they move a level about as far as one fast step, so under the "gradients" rule a level stepped
# every C steps drifts C times slower than the fast level unless its lr is scaled
# (`cms_lr_scaling`).
SCALE_INVARIANT = ("adamw", "muon", "universal_anderson")


def chunk_lr_scale(chunk_size: int, optimizer: str, rule: str) -> float:
    """The factor `cms_lr_scaling` applies to a level's lr: one normalised step on a chunk's
    summed gradient moves a level about lr; the sum of C per-step updates (Eq. 31) is C·η when
    the gradients agree ("chunk") and √C·η when they are noise ("sqrt"). Meant for the
    "gradients" chunk rule: the "updates" rule already sums the C updates."""
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
    beta2: float


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
        settings.append(LevelSetting(spec.name, spec.chunk_size, name, lr, spec.weight_decay,
                                     spec.beta2))
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


def _ratio(update: list[Tensor], weights: list[Tensor]) -> Tensor:
    """‖update‖ / ‖weights‖ over a whole level, as a 0-d fp32 tensor (no host sync)."""
    num = torch.stack([n.float() for n in torch._foreach_norm(update)]).square().sum().sqrt()
    den = torch.stack([n.float() for n in torch._foreach_norm(weights)]).square().sum().sqrt()
    return num / den.clamp_min(1e-12)


class LevelOptimizer:
    """Steps each CMS level's optimizer at its own frequency (see the module docstring).

    `stats_every`: a level with chunk_size 1 measures its update ratio (`update_ratios`) at the
    steps that are multiples of it (a copy of its parameters per measured step; set it to the
    log interval). Slower levels measure every applied chunk, which costs nothing extra.
    """

    def __init__(self, levels: Sequence[Level], amp: str = "none", grad_clip: float = 0.0,
                 init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 chunk_rule: str = "updates", stats_every: int = 1) -> None:
        if amp not in AMP_MODES:
            raise NlmmError(f"precision.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}.")
        if chunk_rule not in CHUNK_RULES:
            raise NlmmError(f"cms_chunk_rule must be one of {', '.join(CHUNK_RULES)}, got {chunk_rule!r}.")
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
        # the open chunk of each level: the sum of its per-step updates so far ("updates") or of
        # its gradients ("gradients"); None where nothing was added yet
        self._accum: list[list[Tensor | None]] = [[None] * len(ps) for ps in self._params]
        # while open chunks are applied: each level's chunk-start weights (None: not applied)
        self._chunk_start: list[list[Tensor | None]] | None = None
        self._base_lrs = [[g["lr"] for g in lvl.optimizer.param_groups] for lvl in self._levels]
        self._lr_factor = 1.0
        self._grad_clip = grad_clip
        self._rule = chunk_rule
        self._stats_every = max(1, int(stats_every))
        self._scaling = amp == "fp16"
        self._scale = init_scale if self._scaling else 1.0
        self._growth_interval = growth_interval
        self._good_steps = 0
        self._grad_norms: dict[str, Tensor] = {}
        self._update_ratios: dict[str, Tensor] = {}
        self.last_step_skipped = False

    @classmethod
    def from_config(cls, level_params: dict[str, list[Parameter]], cfg: Config,
                    extra_levels: Sequence[CMSLevel] = (),
                    no_decay: Collection[Parameter] = ()) -> LevelOptimizer:
        """One optimizer per CMS level of `cfg` (then per `extra_levels` entry, e.g. a
        fine-tuned backbone) over that level's parameters, set up as `level_settings` says.

        Levels without trainable parameters are left out; the parameters in `no_decay` take no
        weight decay. Loss scaling and clipping come from `cfg.precision`, the chunk rule from
        `cfg.cms_chunk_rule`, the update-ratio interval of chunk-1 levels from `train.log_every`.
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
                                        setting.weight_decay, no_decay, setting.beta2)
            levels.append(Level(setting.name, setting.chunk_size, optimizer))
        if not levels:
            raise NlmmError("no CMS level has trainable parameters; check that the model assigns "
                            "its parameters to the levels named in cms_levels.")
        return cls(levels, amp=cfg.precision.amp, grad_clip=cfg.precision.grad_clip,
                   chunk_rule=cfg.cms_chunk_rule, stats_every=cfg.train.log_every)

    # ------------------------------------------------------------------ introspection

    @property
    def levels(self) -> list[Level]:
        return list(self._levels)

    @property
    def chunk_rule(self) -> str:
        return self._rule

    @property
    def loss_scale(self) -> float:
        return self._scale

    @property
    def grad_norms(self) -> dict[str, Tensor]:
        """Pre-clip gradient norm of each level at its last step (only while grad_clip > 0):
        the norm of its fresh gradient, or, under the "gradients" rule, of its chunk sum."""
        return dict(self._grad_norms)

    def update_ratios(self) -> dict[str, float]:
        """‖Δθ‖ / ‖θ‖ of each level's last applied update (norms over the level's parameters,
        θ before the update): per step for chunk_size 1 (measured every `stats_every` steps),
        per chunk otherwise. Levels that have not been updated yet are left out. One host sync;
        call it once per log window (metrics `level/<name>/update_ratio`)."""
        if not self._update_ratios:
            return {}
        device = next(iter(self._update_ratios.values())).device
        values = torch.stack([t.to(device) for t in self._update_ratios.values()]).tolist()
        return dict(zip(self._update_ratios, values))

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
        """Drop the fresh gradients (the open chunk sums are kept: they are mid-chunk state)."""
        for params in self._params:
            for p in params:
                p.grad = None

    def step_all(self, global_step: int) -> list[str]:
        """Take optimizer step `global_step` (1-based, global); return the names of the levels
        whose parameters changed."""
        if global_step < 1:
            raise NlmmError(f"global_step must count optimizer steps from 1, got {global_step}.")
        if self._chunk_start is not None:
            raise NlmmError("step_all was called while the open chunks are applied (flush()): the "
                            "gradients were taken at the wrong weights; call restore_open_chunks() "
                            "before the next forward pass, or use `with open_chunks_applied():`.")
        self.last_step_skipped = False
        if not self._unscale_fresh_grads():
            self.zero_grad()
            if self._scaling:
                self._scale *= 0.5
                self._good_steps = 0
            self.last_step_skipped = True
            return []
        stepped = []
        with torch.no_grad():
            for lvl, params, accum in zip(self._levels, self._params, self._accum):
                due = global_step % lvl.chunk_size == 0
                if lvl.chunk_size == 1:
                    changed = self._step_now(lvl, params, global_step % self._stats_every == 0)
                elif self._rule == "updates":
                    self._step_into_chunk(lvl, params, accum)
                    changed = due and self._apply_chunk(lvl, params, accum)
                else:
                    changed = self._gradient_rule(lvl, params, accum, due)
                if changed:
                    stepped.append(lvl.name)
        self.zero_grad()
        if self._scaling:
            self._good_steps += 1
            if self._good_steps >= self._growth_interval:
                self._scale *= 2.0
                self._good_steps = 0
        return stepped

    def _clip(self, lvl: Level, with_grad: list[Tensor]) -> None:
        if self._grad_clip > 0:
            self._grad_norms[lvl.name] = torch.nn.utils.clip_grad_norm_(with_grad, self._grad_clip)

    def _step_now(self, lvl: Level, params: list[Tensor], measure: bool) -> bool:
        """A chunk-1 level: clip, step; measure the update ratio when asked."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return False
        self._clip(lvl, with_grad)
        before = torch._foreach_mul(with_grad, 1.0) if measure else None
        lvl.optimizer.step()
        if before is not None:
            update = torch._foreach_sub(with_grad, before)
            self._update_ratios[lvl.name] = _ratio(update, before)
        return True

    def _step_into_chunk(self, lvl: Level, params: list[Tensor], accum: list[Tensor | None]) -> None:
        """Eq. 31: step the level's optimizer on its clipped fresh gradient, add the update it
        made to the open chunk sum, and put the chunk-start weights back."""
        index = [i for i, p in enumerate(params) if p.grad is not None]
        if not index:
            return
        with_grad = [params[i] for i in index]
        self._clip(lvl, with_grad)
        start = torch._foreach_mul(with_grad, 1.0)      # θ_i (a copy)
        lvl.optimizer.step()
        torch._foreach_sub_(with_grad, start)           # the parameters now hold the update u_t
        adding_to, adding = [], []
        for i, p in zip(index, with_grad):
            if accum[i] is None:
                accum[i] = p.detach().clone()
            else:
                adding_to.append(accum[i])
                adding.append(p)
        if adding:
            torch._foreach_add_(adding_to, adding)
        torch._foreach_copy_(with_grad, start)          # θ stays θ_i within the chunk

    def _apply_chunk(self, lvl: Level, params: list[Tensor], accum: list[Tensor | None]) -> bool:
        """θ ← θ_i + Σ u_t over the chunk; the chunk sum starts again empty."""
        index = [i for i, a in enumerate(accum) if a is not None]
        if not index:
            return False
        targets, sums = [params[i] for i in index], [accum[i] for i in index]
        self._update_ratios[lvl.name] = _ratio(sums, targets)
        torch._foreach_add_(targets, sums)
        for i in index:
            accum[i] = None
        return True

    def _gradient_rule(self, lvl: Level, params: list[Tensor], accum: list[Tensor | None],
                       due: bool) -> bool:
        """The "gradients" rule: sum the chunk's gradients, one clipped step on the sum when due."""
        self._accumulate(params, accum)
        if not due:
            return False
        for i, p in enumerate(params):
            p.grad, accum[i] = accum[i], None
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return False
        self._clip(lvl, with_grad)
        before = torch._foreach_mul(with_grad, 1.0)
        lvl.optimizer.step()
        self._update_ratios[lvl.name] = _ratio(torch._foreach_sub(with_grad, before), before)
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

    # ------------------------------------------------------------------ open chunks

    @property
    def open_chunks_are_applied(self) -> bool:
        return self._chunk_start is not None

    def flush(self) -> list[str]:
        """Apply every level's open chunk (the updates summed since its last application) to its
        weights now; return the names of the levels that changed. Call it at the end of
        training, before the final checkpoint and test: otherwise up to C_ℓ − 1 steps of every
        slow level's updates are lost.

        Nothing else changes: the open sums stay, and the chunk-start weights are kept, so that
        `state_dict()` taken now resumes a run exactly as if it had not been flushed, and
        `restore_open_chunks()` returns to training. Calling it twice is a no-op. Under the
        "gradients" rule it does nothing (that rule never applied an open chunk)."""
        if self._chunk_start is not None or self._rule != "updates":
            return []
        self._chunk_start = [[None] * len(ps) for ps in self._params]
        flushed = []
        with torch.no_grad():
            for lvl, params, accum, start in zip(self._levels, self._params, self._accum,
                                                  self._chunk_start):
                index = [i for i, a in enumerate(accum) if a is not None]
                for i in index:
                    start[i] = params[i].detach().clone()
                if index:
                    torch._foreach_add_([params[i] for i in index], [accum[i] for i in index])
                    flushed.append(lvl.name)
        return flushed

    def restore_open_chunks(self) -> None:
        """Undo `flush()`: put every flushed level's chunk-start weights back, bit-exactly, so
        that training continues as if it had not been flushed. No-op when nothing is applied."""
        if self._chunk_start is None:
            return
        with torch.no_grad():
            for params, start in zip(self._params, self._chunk_start):
                for p, s in zip(params, start):
                    if s is not None:
                        p.copy_(s)
        self._chunk_start = None

    @contextlib.contextmanager
    def open_chunks_applied(self) -> Iterator[list[str]]:
        """`with optimizer.open_chunks_applied():` — within the block the weights include every
        open chunk (what a checkpoint, an evaluation or an export should see); on leaving it,
        the chunk-start weights are put back and training goes on unchanged. A state_dict()
        taken within the block resumes exactly. Yields the names of the levels flushed."""
        already = self._chunk_start is not None
        flushed = self.flush()
        try:
            yield flushed
        finally:
            if not already:
                self.restore_open_chunks()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: optimizers, open chunk sums, scale, lr
        factor and, while the open chunks are applied (`flush`), the chunk-start weights.

        Like torch's optimizers, the tensors are the live buffers: save (or clone) the result
        before the next step_all, which adds to the chunk sums in place.
        """
        starts = self._chunk_start or [[None] * len(ps) for ps in self._params]
        return {
            "version": _STATE_VERSION,
            "rule": self._rule,
            "lr_factor": self._lr_factor,
            "loss_scaling": self._scaling,
            "loss_scale": self._scale,
            "good_steps": self._good_steps,
            "levels": {
                lvl.name: {
                    "chunk_size": lvl.chunk_size,
                    "optimizer_class": type(lvl.optimizer).__name__,
                    "optimizer": lvl.optimizer.state_dict(),
                    # the open chunk: sum of per-step updates ("updates") or gradients ("gradients")
                    "accum": {i: a for i, a in enumerate(accum) if a is not None},
                    **({"chunk_start": {i: s for i, s in enumerate(start) if s is not None}}
                       if any(s is not None for s in start) else {}),
                }
                for lvl, accum, start in zip(self._levels, self._accum, starts)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `state_dict()`. Load the model's weights first: a state taken while the open
        chunks were applied puts the chunk-start weights back into the parameters."""
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise NlmmError(f"the level optimizer state has version {version!r}, this nlmm "
                            f"reads versions 1 and {_STATE_VERSION}; resume with the nlmm that saved it.")
        saved_rule = state.get("rule", "gradients")     # version 1 summed the gradients
        saved, mine = sorted(state["levels"]), sorted(lvl.name for lvl in self._levels)
        if saved != mine:
            raise NlmmError(f"the checkpoint has levels {saved} but the model has {mine}; resume "
                            f"with the cms_levels the run was started with.")
        open_sums = any(state["levels"][name]["accum"] for name in saved)
        if saved_rule != self._rule and open_sums:
            raise NlmmError(f"the checkpoint's open chunks sum {saved_rule} (cms_chunk_rule "
                            f"{saved_rule}) but this run sums {self._rule}; resume with "
                            f"cms_chunk_rule={saved_rule}.")
        for lvl, params in zip(self._levels, self._params):
            entry = state["levels"][lvl.name]
            if entry["chunk_size"] != lvl.chunk_size:
                raise NlmmError(f"level {lvl.name!r} updated every {entry['chunk_size']} steps in the "
                                f"checkpoint but every {lvl.chunk_size} in the config; resume with "
                                f"the run's cms_levels.")
            if entry["optimizer_class"] != type(lvl.optimizer).__name__:
                raise NlmmError(f"level {lvl.name!r} was trained with {entry['optimizer_class']} but "
                                f"the config builds {type(lvl.optimizer).__name__}; resume with the "
                                f"run's optimizer.")
            for key in ("accum", "chunk_start"):
                if any(not 0 <= i < len(params) or t.shape != params[i].shape
                       for i, t in entry.get(key, {}).items()):
                    raise NlmmError(f"the chunk state of level {lvl.name!r} does not fit its "
                                    f"{len(params)} parameters; resume with the run's model.")
        self.restore_open_chunks()
        for lvl, params, accum in zip(self._levels, self._params, self._accum):
            entry = state["levels"][lvl.name]
            try:
                lvl.optimizer.load_state_dict(entry["optimizer"])
            except ValueError as exc:
                raise NlmmError(f"the optimizer state of level {lvl.name!r} does not fit the model's "
                                f"parameters ({exc}); resume with the model the run was started with.") from None
            with torch.no_grad():
                for i, p in enumerate(params):
                    saved_sum = entry["accum"].get(i)
                    accum[i] = None if saved_sum is None else saved_sum.to(device=p.device, dtype=p.dtype, copy=True)
                    start = entry.get("chunk_start", {}).get(i)
                    if start is not None:
                        p.copy_(start)
        if self._scaling and state["loss_scaling"]:
            self._scale = float(state["loss_scale"])
            self._good_steps = int(state["good_steps"])
        self.set_lr_factor(float(state["lr_factor"]))
