"""The Levels tab of a run: each CMS level's latest update size and gain, and the update size
over the run on a log scale, so a slow level that barely moves shows at a glance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from console.widgets.chart import MetricChart, Points
from nlmm.cli.reports import LevelMotion

TITLE = "relative update ‖Δθ‖/‖θ‖ per CMS level (log scale)"
BARELY_MOVES = "barely moves"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def levels_table(levels: Sequence[LevelMotion]) -> Table | Text:
    """A row per level: chunk, update/weights, the same per step, mean |gain| and a warning."""
    if not levels:
        return Text("no level figures yet: the worker logs them with its first log window",
                    style="dim")
    table = Table(box=None, padding=(0, 1), expand=False)
    for column in ("level", "chunk", "update/weights", "per step", "mean |gain|", ""):
        table.add_column(column, justify="left" if column in ("level", "") else "right")
    for m in levels:
        table.add_row(m.name, str(m.chunk_size), _sci(m.update_ratio), _sci(m.per_step),
                      "-" if m.gain is None else f"{m.gain:.4f}",
                      Text(BARELY_MOVES, style="bold yellow") if m.still else "")
    return table


class LevelsPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="levels-table")
        yield MetricChart(TITLE, log_y=True, id="chart-levels")

    def show(self, levels: Sequence[LevelMotion], series: Mapping[str, Points]) -> None:
        self.query_one("#levels-table", Static).update(levels_table(levels))
        self.query_one("#chart-levels", MetricChart).show(series)
