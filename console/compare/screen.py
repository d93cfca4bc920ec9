"""Several runs' curves of one metric overlaid on one chart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Header, Select, SelectionList

from console.polling import PollingScreen
from console.widgets.chart import MetricChart, Points
from console.widgets.key_footer import KeyFooter
from console.widgets.ticks import TickList
from nlmm import store

MAX_POINTS = 300
PREFERRED_METRICS = ("mean_r1", "loss")


@dataclass(frozen=True)
class CompareSnapshot:
    runs: list[store.Run]
    keys: list[str]
    metric: str | None
    version: tuple[object, ...]
    series: dict[str, Points] | None  # run name -> points; None when unchanged since last shown


class CompareScreen(PollingScreen[CompareSnapshot]):
    HELP = ("Tick runs on the left (Space), pick the metric above the chart (m); the chart "
            "overlays the chosen metric of every ticked run.")

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("m", "focus_metric", "Metric"),
        Binding("r", "focus_runs", "Runs", show=False),
    ]

    def __init__(self, run_ids: Sequence[int]) -> None:
        super().__init__()
        self.selected: list[int] = list(run_ids)
        self.metric: str | None = None
        self._listed: list[int] = []
        self._keys: list[str] = []
        self._shown_version: tuple[object, ...] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="compare-body"):
            yield TickList[int](id="compare-runs")
            with Vertical(id="compare-main"):
                yield Select[str]([], prompt="metric", allow_blank=True, id="compare-metric",
                                  compact=True)
                yield MetricChart("tick runs to compare", empty="no points yet", id="compare-chart")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.sub_title = "compare"
        self.query_one("#compare-runs").border_title = "runs"

    # ---- data

    def fetch(self) -> CompareSnapshot:
        runs = store.list_runs()
        by_id = {run.id: run for run in runs}
        chosen = [run_id for run_id in self.selected if run_id in by_id]
        keys = sorted({key for run_id in chosen for key in store.metric_keys(run_id)})
        metric = self.metric if self.metric in keys else next(
            (k for k in PREFERRED_METRICS if k in keys), keys[0] if keys else None)
        version = (metric, tuple((run_id, by_id[run_id].step, by_id[run_id].heartbeat_at,
                                  by_id[run_id].status) for run_id in chosen))
        series = None
        if version != self._shown_version:
            points = (store.metric_series_many(chosen, metric, max_points=MAX_POINTS)
                      if chosen and metric is not None else {})
            series = {by_id[run_id].name: points[run_id] for run_id in points}
        return CompareSnapshot(runs, keys, metric, version, series)

    def apply(self, snapshot: CompareSnapshot) -> None:
        self.metric = snapshot.metric
        runs_list = self.query_one("#compare-runs", SelectionList)
        ids = [run.id for run in snapshot.runs]
        if ids != self._listed:
            runs_list.clear_options()
            runs_list.add_options([(run.name, run.id, run.id in self.selected)
                                   for run in snapshot.runs])
            self._listed = ids
        select = self.query_one("#compare-metric", Select)
        if snapshot.keys != self._keys:
            with select.prevent(Select.Changed):
                select.set_options([(key, key) for key in snapshot.keys])
            self._keys = snapshot.keys
        if self.metric is not None and select.value != self.metric:
            with select.prevent(Select.Changed):
                select.value = self.metric
        if snapshot.series is not None:
            title = self.metric or ("no metrics in the ticked runs" if self.selected
                                    else "tick runs to compare")
            self.query_one("#compare-chart", MetricChart).show(snapshot.series, title=title)
            self._shown_version = snapshot.version

    # ---- events

    @on(SelectionList.SelectedChanged, "#compare-runs")
    def _ticks_changed(self, event: SelectionList.SelectedChanged) -> None:
        self.selected = list(event.selection_list.selected)
        self.refetch()

    @on(Select.Changed, "#compare-metric")
    def _metric_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.metric = event.value
            self.refetch()

    def action_focus_metric(self) -> None:
        self.query_one("#compare-metric", Select).focus()

    def action_focus_runs(self) -> None:
        self.query_one("#compare-runs", SelectionList).focus()
