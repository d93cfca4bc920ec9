"""The first screen: every run in the store, live, filtered by status and name."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Header, Input, Label, Static

from console import formatting as fmt
from console.checkpoints.screen import CheckpointsScreen
from console.compare.screen import CompareScreen
from console.polling import PollingScreen
from console.run.screen import RunScreen
from console.widgets.key_footer import KeyFooter
from console.widgets.keyed_table import KeyedTable, Row
from nlmm import store
from nlmm.cli.reports import status_text
from nlmm.units import recall_cell

# what `f` cycles through, starting from all runs
STATUS_FILTERS: tuple[store.RunStatus | None, ...] = (
    None, store.RunStatus.RUNNING, store.RunStatus.QUEUED, store.RunStatus.FINISHED,
    store.RunStatus.STOPPED, store.RunStatus.FAILED, store.RunStatus.LOST)

EMPTY_STORE = """\
[b]No runs in this store yet.[/b]

Start one from a shell:

  [b]nlmm train flickr8k[/b]               downloads Flickr8k + FACC, then trains
  [b]nlmm train flickr8k --synthetic[/b]   trains on a small offline synthetic corpus

or press [b]n[/b] here to start one from a config. Runs appear here as soon as they start."""

COLUMNS = (("mark", " "), ("name", "name"), ("status", "status"), ("progress", "prog"),
           ("epoch", "epoch · step"), ("best", "best R@1"), ("elapsed", "elapsed"),
           ("device", "device"), ("started", "started"))
# Hidden, in this order, when the table is too narrow for every column (the run screen has both).
NARROW_HIDES = ("device", "epoch")


@dataclass(frozen=True)
class RunsSnapshot:
    runs: list[store.Run]
    store_empty: bool


def run_row(run: store.Run, now: float, marked: bool) -> Row:
    return (str(run.id), (
        Text("●", style="bold") if marked else Text(" "),
        run.name,
        status_text(run.status),
        fmt.percent(fmt.progress_fraction(run)),
        fmt.epoch_step(run),
        recall_cell(run.best_metric),
        fmt.duration(store.elapsed_seconds(run, now)),
        run.device or "-",
        fmt.local_time(run.created_at),  # the first start: a resume moves started_at
    ))


class RunsScreen(PollingScreen[RunsSnapshot]):
    """Runs table; Enter opens a run, Space marks runs to compare."""

    @dataclass
    class StopRequested(Message):
        """Stop the selected `run` once the user confirms (the app asks, then stops it)."""

        run: store.Run

    AUTO_FOCUS = "#runs-table"
    HELP = "All runs, newest first. Mark several with Space and press c to overlay their curves."

    BINDINGS = [
        Binding("enter", "open", "Open", show=False),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("p", "checkpoints", "Checkpoints"),
        Binding("x", "stop", "Stop"),
        Binding("n", "app.new_run", "New run"),
        Binding("slash", "filter_name", "Filter", key_display="/", show=False),
        Binding("f", "cycle_status", "Status filter", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.status_filter: str | None = None
        self.name_filter = ""
        self.marked: set[int] = set()
        self.runs: dict[int, store.Run] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="runs-filters"):
            yield Input(placeholder="filter by name  (/)", id="name-filter", compact=True)
            yield Label(self._status_label(), id="status-filter")
            yield Label("", id="runs-count")
        yield KeyedTable(COLUMNS, id="runs-table", flex="name", optional=NARROW_HIDES)
        yield Static(EMPTY_STORE, id="runs-empty")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.sub_title = "runs"
        self.query_one("#runs-empty").display = False

    def _status_label(self) -> str:
        return f"status: {self.status_filter or 'all'}  (f)"

    # ---- data

    def fetch(self) -> RunsSnapshot:
        # listing only reads: the sweep is what turns a worker that died unseen into `lost`
        store.mark_lost()
        runs = store.list_runs(status=self.status_filter, name_like=self.name_filter or None)
        filtered = self.status_filter is not None or bool(self.name_filter)
        empty = not runs and (not filtered or store.latest_run() is None)
        return RunsSnapshot(runs, empty)

    def apply(self, snapshot: RunsSnapshot) -> None:
        self.runs = {run.id: run for run in snapshot.runs}
        self._render_rows()
        table = self.query_one("#runs-table", KeyedTable)
        self.query_one("#runs-empty").display = snapshot.store_empty
        table.display = not snapshot.store_empty
        count = len(snapshot.runs)
        self.query_one("#runs-count", Label).update(
            "no runs match" if not count and not snapshot.store_empty
            else f"{count} run{'s' if count != 1 else ''}")

    def _render_rows(self) -> None:
        now = self.dash.clock()
        self.query_one("#runs-table", KeyedTable).sync(
            [run_row(run, now, run.id in self.marked) for run in self.runs.values()])

    # ---- selection

    def selected_run(self) -> store.Run | None:
        key = self.query_one("#runs-table", KeyedTable).current_key
        return None if key is None else self.runs.get(int(key))

    def _require_run(self) -> store.Run | None:
        run = self.selected_run()
        if run is None:
            self.notify("no run selected; start one with n", severity="warning")
        return run

    @on(KeyedTable.RowSelected, "#runs-table")
    def _row_chosen(self, event: KeyedTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    # ---- actions

    def action_open(self) -> None:
        run = self._require_run()
        if run is not None:
            self.app.push_screen(RunScreen(run.id))

    def action_mark(self) -> None:
        run = self._require_run()
        if run is None:
            return
        self.marked.symmetric_difference_update({run.id})
        self._render_rows()

    def action_compare(self) -> None:
        chosen = self.marked or ({run.id} if (run := self.selected_run()) else set())
        self.app.push_screen(CompareScreen(sorted(chosen)))

    def action_checkpoints(self) -> None:
        run = self._require_run()
        if run is not None:
            self.app.push_screen(CheckpointsScreen(run.id))

    def action_stop(self) -> None:
        run = self._require_run()
        if run is not None:
            self.post_message(self.StopRequested(run))

    @property
    def search_run(self) -> str | None:
        """The run the search screen starts with: the selected one when it has a best checkpoint."""
        run = self.selected_run()
        return run.name if run is not None and run.best_metric is not None else None

    def action_filter_name(self) -> None:
        self.query_one("#name-filter", Input).focus()

    def action_clear_filter(self) -> None:
        field = self.query_one("#name-filter", Input)
        field.value = ""
        self.query_one("#runs-table", KeyedTable).focus()

    def action_cycle_status(self) -> None:
        index = STATUS_FILTERS.index(self.status_filter)
        self.status_filter = STATUS_FILTERS[(index + 1) % len(STATUS_FILTERS)]
        self.query_one("#status-filter", Label).update(self._status_label())
        self.refetch()

    @on(Input.Changed, "#name-filter")
    def _name_filter_changed(self, event: Input.Changed) -> None:
        self.name_filter = event.value.strip()
        self.refetch()

    @on(Input.Submitted, "#name-filter")
    def _name_filter_done(self) -> None:
        self.query_one("#runs-table", KeyedTable).focus()
