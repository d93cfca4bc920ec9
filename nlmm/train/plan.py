"""What a resumed run trains when `nlmm train --resume RUN` asks for more steps or epochs.

`--steps N` and `--epochs N` on a resume count from where the run stands (its last checkpoint),
finished or not: N more optimizer steps, N more epochs' worth of steps. Given both, the run stops
at whichever comes first, as a new run's `--epochs` bound and `--steps` cap do. The plan is
written back as the epochs and `train_steps` a new run would be given for it, so the store,
`runs ls`, `runs show`, the dash and train.log all show the steps and epochs the run is now
headed for.

Sizing needs the steps per epoch, known once the worker has opened the corpus, so the worker
resolves it (`extended_plan`) before training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nlmm.config import Config


@dataclass(frozen=True)
class Extension:
    """More training asked of a resumed run: `steps` more optimizer steps, `epochs` more epochs."""
    steps: int | None = None
    epochs: int | None = None

    def __bool__(self) -> bool:
        return bool(self.steps or self.epochs)

    def describe(self) -> str:
        parts = [f"{n} more {unit}{'s' if n != 1 else ''}"
                 for n, unit in ((self.epochs, "epoch"), (self.steps, "step")) if n]
        return " and at most ".join(parts) if len(parts) == 2 else parts[0]


def extended_plan(cfg: Config, ext: Extension, global_step: int, epochs_done: int,
                  steps_into_epoch: int, steps_per_epoch: int) -> Config:
    """`cfg` with the epochs and train_steps of a run at `global_step` (`epochs_done` whole
    epochs and `steps_into_epoch` steps of the next one) that trains `ext` more.

    The epochs bound is where `ext.epochs` more epochs end, or, with `ext.steps` alone, the
    run's own epochs when they hold the extra steps (else as many as do). The cap is dropped
    when the epochs end there anyway, so a run extended to an epoch's end keeps its configured
    warmup rather than a short run's.
    """
    # where the loader stands, which is past global_step when a batch was skipped (non-finite)
    position = epochs_done * steps_per_epoch + steps_into_epoch
    more = min(n for n in (ext.steps, ext.epochs * steps_per_epoch if ext.epochs else None) if n)
    if ext.epochs:
        epochs = -(-(position + ext.epochs * steps_per_epoch) // steps_per_epoch)
    else:
        epochs = max(cfg.train.epochs, -(-(position + more) // steps_per_epoch))
    cap: int | None = global_step + more
    if cap >= epochs * steps_per_epoch:
        cap = None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs),
                               train_steps=cap)
