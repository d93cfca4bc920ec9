"""One run: progress with ETA, curves, CMS levels, GPU/host panel and log tail, refreshed while
it trains.

Only the visible tab is read from the store, and a chart is read again only when the run's
row changed (the metric writer bumps step and heartbeat on every flush), so an idle or finished
run costs one small query per second however many metric rows it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Header, TabbedContent, TabPane

from console.checkpoints.screen import CheckpointsScreen
from console.polling import PollingScreen
from console.run.header import RunHeader, health_warnings
from console.run.levels import LevelsPanel
from console.run.log_tail import LogTail, Tail, read_tail
from console.run.system_panel import HISTORY, SystemPanel
from console.widgets.chart import MetricChart, Points
from console.widgets.key_footer import KeyFooter
from nlmm import store
from nlmm.config import MODALITIES
from nlmm.metric_names import DIRECTIONS, KS, LOSS_KEYS
from nlmm.cli.reports import LevelMotion, level_motion, level_names, still_key

MAX_POINTS = 300
# Samples read for the system panel: the sparkline history for up to 8 GPUs and the host.
SAMPLE_ROWS = HISTORY * 9

# tab id -> (title shown on the tab, key that selects it)
TABS = {"loss": ("Loss", "1"), "recall": ("Recall", "2"), "lr": ("LR", "3"),
        "speed": ("Speed", "4"), "spread": ("Spread", "5"), "system": ("System", "6"),
        "log": ("Log", "7"), "levels": ("Levels", "8")}
CHART_TABS = ("loss", "recall", "lr", "speed", "spread")
HEALTH_KEYS = tuple(f"collapsed/{m}" for m in MODALITIES)
TEST_KEY = "test/mean_r1"  # the dev-selected best checkpoint's, logged when a run finishes
RATE_KEY = "triples_per_s"  # the latest training throughput, which the ETA is reckoned at


def chart_series(run_id: int, chart: str, keys: list[str], k: int) -> tuple[dict[str, Points], str]:
    """The lines of one chart (label -> points) and its title, read downsampled from the store."""
    present = set(keys)
    if chart == "loss":
        wanted = {key: key for key in LOSS_KEYS if key in present}
        title = "loss (total and per pair)"
    elif chart == "recall":
        wanted = {f"{d}_r{k}": d for d in DIRECTIONS if f"{d}_r{k}" in present}
        if k == 1 and "mean_r1" in present:
            wanted["mean_r1"] = "mean"
        title = f"Recall@{k} (%) per direction   k: K={'/'.join(map(str, KS))}"
    elif chart == "spread":
        wanted = {key: key.removeprefix("spread/") for key in keys if key.startswith("spread/")}
        title = "embedding spread (mean pairwise cosine; near 1 = collapsed)"
    elif chart == "lr":
        wanted = {key: key.removeprefix("lr/") for key in keys if key.startswith("lr/")}
        title = "learning rate per CMS level"
    else:
        wanted = {"triples_per_s": "triples/s"} if "triples_per_s" in present else {}
        title = "throughput (triples/s)"
    series = {label: store.metric_series(run_id, key, max_points=MAX_POINTS)
              for key, label in wanted.items()}
    return series, title


@dataclass
class RunSnapshot:
    run: store.Run
    version: tuple[Any, ...]
    charts: dict[str, tuple[dict[str, Points], str]] = field(default_factory=dict)
    samples: list[store.SystemSample] | None = None
    tail: Tail | None = None
    health: list[str] | None = None
    test_r1: float | None = None
    rate: float | None = None
    levels: tuple[list[LevelMotion], dict[str, Points]] | None = None


class RunScreen(PollingScreen[RunSnapshot]):
    @dataclass
    class StopRequested(Message):
        """Stop this `run` once the user confirms (the app asks, then stops it)."""

        run: store.Run

    HELP = ("One run, live. 1-8 switch tabs (8: how far each CMS level moves); k changes K on "
            "the Recall tab; p lists its checkpoints; x stops it.")

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        *[Binding(key, f"tab('{tab}')", title, show=False) for tab, (title, key) in TABS.items()],
        Binding("k", "cycle_k", "Recall K"),
        Binding("p", "checkpoints", "Checkpoints"),
        Binding("x", "stop", "Stop"),
    ]

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id
        self.run: store.Run | None = None
        self.k = 1
        self.active_tab = "loss"
        # What each tab last showed: (run version, K) for charts, the run version for samples.
        self._shown: dict[str, tuple[Any, ...]] = {}
        self._log_stamp: tuple[int, int] | None = None
        self._health: list[str] = []
        self._test_r1: float | None = None
        self._rate: float | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunHeader(id="run-header")
        with TabbedContent(initial="tab-loss", id="run-tabs"):
            for tab, (title, key) in TABS.items():
                with TabPane(f"{key} {title}", id=f"tab-{tab}"):
                    if tab in CHART_TABS:
                        yield MetricChart(title, id=f"chart-{tab}")
                    elif tab == "levels":
                        yield LevelsPanel(id="levels-panel")
                    elif tab == "system":
                        yield SystemPanel(id="system-panel")
                    else:
                        yield LogTail(id="log-tail")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.sub_title = "run"

    @property
    def search_run(self) -> str | None:
        return self.run.name if self.run is not None and self.run.best_metric is not None else None

    # ---- data

    def fetch(self) -> RunSnapshot:
        run = store.get_run(self.run_id)
        version = (run.status, run.step, run.epoch, run.heartbeat_at, run.best_metric, run.ended_at,
                   run.phase)
        snapshot = RunSnapshot(run, version)
        if self._shown.get("health") != version:
            stills = tuple(still_key(name) for name, _ in level_names(run))
            latest = store.latest_metrics(run.id, HEALTH_KEYS + stills + (TEST_KEY, RATE_KEY))
            snapshot.health = health_warnings(latest)
            snapshot.test_r1 = latest.get(TEST_KEY)
            snapshot.rate = latest.get(RATE_KEY)
        tab = self.active_tab
        if tab in CHART_TABS and self._shown.get(tab) != (version, self.k):
            keys = store.metric_keys(run.id)
            snapshot.charts[tab] = chart_series(run.id, tab, keys, self.k)
        elif tab == "levels" and self._shown.get(tab) != version:
            series = {name: store.metric_series(run.id, f"level/{name}/update_ratio",
                                                max_points=MAX_POINTS)
                      for name, _ in level_names(run)}
            snapshot.levels = (level_motion(run), {k: v for k, v in series.items() if v})
        elif tab == "system" and self._shown.get(tab) != version:
            snapshot.samples = store.system_samples(run_id=run.id, limit=SAMPLE_ROWS)
        elif tab == "log":
            snapshot.tail = read_tail(run.log_path, known=self._log_stamp)
        return snapshot

    def apply(self, snapshot: RunSnapshot) -> None:
        self.run = snapshot.run
        self.sub_title = snapshot.run.name
        if snapshot.health is not None:
            self._health, self._test_r1 = snapshot.health, snapshot.test_r1
            self._rate = snapshot.rate
            self._shown["health"] = snapshot.version
        self.query_one(RunHeader).show(snapshot.run, self.dash.clock(), self._health, self._test_r1,
                                       self._rate)
        for tab, (series, title) in snapshot.charts.items():
            self.query_one(f"#chart-{tab}", MetricChart).show(series, title)
            self._shown[tab] = (snapshot.version, self.k)
        if snapshot.levels is not None:
            self.query_one(LevelsPanel).show(*snapshot.levels)
            self._shown["levels"] = snapshot.version
        if snapshot.samples is not None:
            self.query_one(SystemPanel).show(snapshot.samples)
            self._shown["system"] = snapshot.version
        if snapshot.tail is not None:
            self.query_one(LogTail).show(snapshot.tail)
            self._log_stamp = snapshot.tail.stamp

    # ---- actions

    @on(TabbedContent.TabActivated, "#run-tabs")
    def _tab_shown(self, event: TabbedContent.TabActivated) -> None:
        self.active_tab = (event.pane.id or "tab-loss").removeprefix("tab-")
        self.refetch()

    def action_tab(self, tab: str) -> None:
        self.query_one("#run-tabs", TabbedContent).active = f"tab-{tab}"

    def action_cycle_k(self) -> None:
        self.k = KS[(KS.index(self.k) + 1) % len(KS)]
        self.action_tab("recall")
        self.refetch()

    def action_checkpoints(self) -> None:
        self.app.push_screen(CheckpointsScreen(self.run_id))

    def action_stop(self) -> None:
        if self.run is not None:
            self.post_message(self.StopRequested(self.run))
