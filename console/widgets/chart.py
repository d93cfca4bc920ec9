"""A plotext line chart that re-plots only when its series change."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from textual_plotext import PlotextPlot

Points = Sequence[tuple[int, float]]

# Fixed colours per position, so a line keeps its colour when another one appears or goes.
PALETTE = ("cyan", "orange", "green", "magenta", "blue", "red", "yellow", "white")


class MetricChart(PlotextPlot):
    """Lines of (step, value) points, one per label, with a title that says what is shown.

    `log_y`: a logarithmic y axis, for figures that differ by orders of magnitude (the update
    of a slow CMS level beside the fast one's); points at or below 0 are then left out."""

    def __init__(self, title: str, *, empty: str = "no data yet", log_y: bool = False,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.chart_title = title
        self.empty = empty
        self.log_y = log_y
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.replots = 0  # how many times the figure was rebuilt; polling must not grow it idly
        self._draw()

    def show(self, series: Mapping[str, Points], title: str | None = None) -> bool:
        """Plot `series` (label -> points); returns False, doing nothing, when nothing changed."""
        fresh = {label: list(points) for label, points in series.items()}
        title = self.chart_title if title is None else title
        if fresh == self.series and title == self.chart_title:
            return False
        self.series, self.chart_title = fresh, title
        self._draw()
        # textual-plotext renders from its figure on refresh; the widget, not the app, repaints.
        self.refresh()
        return True

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        drawn = False
        for index, (label, points) in enumerate(self.series.items()):
            finite = [(s, v) for s, v in points if math.isfinite(v) and (v > 0 or not self.log_y)]
            if not finite:
                continue
            steps, values = zip(*finite)
            plt.plot(list(steps), list(values), label=label, color=PALETTE[index % len(PALETTE)],
                     marker="braille")
            drawn = True
        plt.title(self.chart_title if drawn else f"{self.chart_title}: {self.empty}")
        plt.xlabel("step")
        if self.log_y and drawn:
            plt.yscale("log")
        self.replots += 1
