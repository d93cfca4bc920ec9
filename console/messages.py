"""What screens ask of the app: they post these and the app, which owns runs and models, acts.

A screen never calls the app directly, so a screen can be driven (and tested) on its own and the
app stays the one place that starts workers that outlive a screen.
"""

from __future__ import annotations

from pathlib import Path

from textual.message import Message

from nlmm import store


class StopRequested(Message):
    """Stop `run` once the user confirms (its worker checkpoints first)."""

    def __init__(self, run: store.Run) -> None:
        super().__init__()
        self.run = run


class SearchRequested(Message):
    """Open the search screen on `checkpoint`, or on the best checkpoint of `run` when it is None
    (of the latest finished run when both are None)."""

    def __init__(self, run: str | None = None, checkpoint: Path | None = None) -> None:
        super().__init__()
        self.run = run
        self.checkpoint = checkpoint
