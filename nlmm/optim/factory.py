"""Build one of the configured optimizers by name (the names are `nlmm.config.OPTIMIZERS`)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch.nn import Parameter

from nlmm.config import OPTIMIZERS, CMSLevel
from nlmm.errors import NlmmError
from nlmm.optim.anderson import UniversalAnderson
from nlmm.optim.dmgd import DMGD
from nlmm.optim.muon import Muon


class SGDW(torch.optim.SGD):
    """torch's SGD with momentum, with weight decay decoupled: p ← p (1 − lr·wd), then the SGD step.

    torch's own `weight_decay` adds wd·p to the gradient, which momentum then amplifies by
    1/(1 − momentum); decoupling keeps the decay the same for every optimizer of a level.
    """

    def __init__(self, params: Iterable[Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)
        for group in self.param_groups:
            # a group's own weight_decay (e.g. 0 for norms) becomes its decoupled decay; torch's
            # coupled decay stays off
            group.setdefault("decoupled_weight_decay", group["weight_decay"])
            group["weight_decay"] = 0.0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for group in self.param_groups:
            decay = group["lr"] * group["decoupled_weight_decay"]
            if decay:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    torch._foreach_mul_(params, 1.0 - decay)
        return super().step(closure)


BETA1 = 0.9


def _adamw(params: list[dict[str, Any]], lr: float, weight_decay: float,
           beta2: float) -> torch.optim.Optimizer:
    fused = all(p.is_cuda and p.is_floating_point() for g in params for p in g["params"])
    return torch.optim.AdamW(params, lr=lr, betas=(BETA1, beta2), weight_decay=weight_decay,
                             fused=fused or None)


_BUILDERS: dict[str, Callable[[list[dict[str, Any]], float, float, float],
                              torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": lambda params, lr, wd, _: SGDW(params, lr=lr, momentum=0.9, weight_decay=wd),
    "dmgd": lambda params, lr, wd, _: DMGD(params, lr=lr, weight_decay=wd),
    "muon": lambda params, lr, wd, b2: Muon(params, lr=lr, weight_decay=wd, betas=(BETA1, b2)),
    "universal_anderson": lambda params, lr, wd, b2: UniversalAnderson(
        params, lr=lr, weight_decay=wd, betas=(BETA1, b2)),
}


def build_optimizer(name: str, params: list[Parameter], lr: float, weight_decay: float,
                    no_decay: Collection[Parameter] = (), beta2: float = CMSLevel.beta2
                    ) -> torch.optim.Optimizer:
    """The optimizer called `name` over `params` with this learning rate, decoupled weight
    decay and (Adam family) β2; the parameters in `no_decay` form a second group without
    decay."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise NlmmError(f"unknown optimizer {name!r}; use one of: {', '.join(OPTIMIZERS)}.")
    params = list(params)
    if not params:
        raise NlmmError(f"optimizer {name!r} was given no parameters; give it at least one "
                        f"parameter or leave that level out.")
    skip = {id(p) for p in no_decay}
    groups = [{"params": [p for p in params if id(p) not in skip], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    return builder([g for g in groups if g["params"]], lr, weight_decay, beta2)
