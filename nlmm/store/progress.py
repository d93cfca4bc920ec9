"""How long a run has trained and how long it has left, across resumes, and what it plans to train.

Every worker of a run is one stretch (started_at to ended_at, or to now while it is active);
`elapsed_before` holds the stretches of the earlier workers, so the figures here add up over any
number of stops and resumes. The CLI, the follower's progress bar and the dashboard all read
them from here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from nlmm.store.status import RunStatus

if TYPE_CHECKING:  # this module is read without SQLAlchemy by `nlmm runs ls`
    from nlmm.store.models import Run


def elapsed_seconds(run: Run, now: float) -> float | None:
    """Seconds the run has trained over all its workers (the active one up to `now`); None
    before any worker started. A run queued for a resume shows its earlier workers' total
    until the new worker registers."""
    if run.started_at is None:
        return None
    end = now if run.ended_at is None else run.ended_at
    return (run.elapsed_before or 0.0) + max(0.0, end - run.started_at)


def eta_seconds(run: Run, now: float, triples_per_s: float | None = None) -> float | None:
    """Time left for a running run; None until there is a rate.

    With `triples_per_s` (the latest log window's throughput, which the training loop measures
    over training steps only) the steps left at that rate, as train.log's ETA: evaluations and
    checkpoints stay out of the rate, so the ETA no longer jumps after each evaluation. Without
    it (no window logged yet), the run's average rate over all its time so far.
    """
    if run.status != RunStatus.RUNNING or not run.steps_total or not run.step:
        return None
    left = max(0, run.steps_total - run.step)
    per_step = triples_per_step(run)
    if triples_per_s and triples_per_s > 0 and per_step:
        return left * per_step / triples_per_s
    spent = elapsed_seconds(run, now)
    if not spent:
        return None
    return left * spent / run.step


def triples_per_step(run: Run) -> int | None:
    """Training triples in one optimizer step (batch × accumulate) of the run's config."""
    train = json.loads(run.config or "{}").get("train") or {}
    batch, accumulate = train.get("batch_size"), train.get("accumulate") or 1
    return batch * accumulate if batch else None


def steps_cap_note(requested: int | None, planned: int | None, epochs: int | None) -> str | None:
    """The sentence saying that `--steps` (train_steps) asks for more steps than the run's epochs
    hold, so the run stops at the end of its epochs; None when the cap is within the plan.

    `--steps` stops a run early and never extends it: the epochs still bound the run.
    """
    if not requested or not planned or not epochs or requested <= planned:
        return None
    per_epoch = planned // epochs
    needed = -(-requested // per_epoch)
    return (f"--steps {requested} is more than the {planned} steps of {epochs} epochs "
            f"({per_epoch} per epoch), so the run stops after {planned} steps; to train "
            f"{requested}, give it {needed} epochs in all with --epochs.")
