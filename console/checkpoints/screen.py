"""A run's checkpoints with their metrics; evaluate, export, resume from, or search with one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Header, Static

from console.checkpoints.more_epochs import MoreEpochsScreen
from console.errors import ACTION_ERRORS
from console.polling import PollingScreen
from console.widgets.key_footer import KeyFooter
from console.widgets.keyed_table import KeyedTable, Row
from nlmm import store
from nlmm.paths import checkpoint_home
from nlmm.cli.reports import recall_table
from nlmm.units import file_size, recall_cell, size_on_disk

COLUMNS = (("best", "★"), ("kind", "kind"), ("step", "step"), ("epoch", "epoch"),
           ("mean", "mean R@1"), ("i2t", "i2t R@1"), ("t2i", "t2i R@1"), ("size", "size"),
           ("file", "file"))


@dataclass(frozen=True)
class CheckpointsSnapshot:
    run: store.Run
    checkpoints: list[store.Checkpoint]
    sizes: dict[str, int | None]  # by file path: its size on disk now, None when it is gone


@dataclass(frozen=True)
class Evaluation:
    """Test results of a checkpoint file, and the step it held when it was evaluated."""

    step: int
    result: dict[str, Any]

    def show(self, ckpt: store.Checkpoint) -> list[Any]:
        """The results as a grid, after a warning line when the file has since been saved
        again at another step (its rows then describe weights that are gone)."""
        parts: list[Any] = []
        if ckpt.step != self.step:
            parts.append(Text(f"evaluated at step {self.step}, before the worker saved "
                              f"{Path(ckpt.path).name} again at step {ckpt.step}:",
                              style="yellow"))
        title = f"{self.result['split']} Recall@K (%) at step {self.step}"
        return [*parts, recall_table(self.result["metrics"], title=title, compact=True)]


def checkpoint_row(ckpt: store.Checkpoint, size: int | None) -> Row:
    """Keyed by file: a worker saving last.pt or best.pt again replaces the store row (new id),
    and the cursor and any test results stay with the file. `size`: the file's size now (not
    the one recorded when it was saved: a file truncated since shows what is left of it)."""
    metrics = ckpt.metrics or {}
    return (ckpt.path, (
        Text("★", style="bold yellow") if ckpt.is_best else Text(""),
        ckpt.kind, str(ckpt.step), str(ckpt.epoch),
        recall_cell(metrics.get("mean_r1")), recall_cell(metrics.get("i2t_r1")),
        recall_cell(metrics.get("t2i_r1")), "missing" if size is None else file_size(size),
        Path(ckpt.path).name))


def export_folder(ckpt: store.Checkpoint) -> Path:
    """`runs/<run>/export/<kind>-step<N>/`, beside the run's checkpoints folder."""
    return checkpoint_home(ckpt.path) / "export" / f"{ckpt.kind}-step{ckpt.step}"


class CheckpointsScreen(PollingScreen[CheckpointsSnapshot]):
    # What it asks of the app, which opens searches and is the only one that starts runs

    @dataclass
    class SearchRequested(Message):
        """Open the search screen on `checkpoint`."""

        checkpoint: Path

    @dataclass
    class ResumeRequested(Message):
        """Resume `run` from its last.pt, for `add_epochs` more epochs when it had finished."""

        run: str
        add_epochs: int | None

    # What its evaluate and export workers report, to this screen alone (they do not bubble)

    @dataclass
    class Evaluated(Message):
        """`ckpt`, evaluated on the test split, gave `result` (`nlmm eval`'s)."""

        bubble = False
        ckpt: store.Checkpoint
        result: dict[str, Any]

    @dataclass
    class Exported(Message):
        """The bundle was written to `folder`."""

        bubble = False
        folder: Path

    @dataclass
    class ActionFailed(Message):
        """An evaluation or export failed: `title` says which, `error` why."""

        bubble = False
        title: str
        error: str

    HELP = ("A run's checkpoints (★ marks the best). e evaluates the selected one on the test "
            "split, x exports it as a bundle, r resumes the run, Enter or s searches with it.")

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("e", "evaluate", "Evaluate"),
        Binding("x", "export", "Export"),
        Binding("r", "resume", "Resume"),
        Binding("s", "search_with", "Search"),
    ]

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id
        self.run: store.Run | None = None
        self.checkpoints: dict[str, store.Checkpoint] = {}  # by file path, as the table rows
        self.results: dict[str, Evaluation] = {}  # by file path: test results of an evaluation
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield KeyedTable(COLUMNS, id="ckpt-table")
        yield Static(id="ckpt-detail")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.sub_title = "checkpoints"

    # ---- data

    def fetch(self) -> CheckpointsSnapshot:
        checkpoints = store.list_checkpoints(self.run_id)
        return CheckpointsSnapshot(store.get_run(self.run_id), checkpoints,
                                   {c.path: size_on_disk(c.path) for c in checkpoints})

    def apply(self, snapshot: CheckpointsSnapshot) -> None:
        self.run = snapshot.run
        self.sub_title = f"{snapshot.run.name} · checkpoints"
        self.checkpoints = {c.path: c for c in snapshot.checkpoints}
        self.query_one("#ckpt-table", KeyedTable).sync(
            [checkpoint_row(c, snapshot.sizes.get(c.path)) for c in snapshot.checkpoints])
        self._show_detail()

    def selected(self) -> store.Checkpoint | None:
        key = self.query_one("#ckpt-table", KeyedTable).current_key
        return None if key is None else self.checkpoints.get(key)

    def _show_detail(self) -> None:
        detail = self.query_one("#ckpt-detail", Static)
        ckpt = self.selected()
        if ckpt is None:
            detail.update(Text("no checkpoints yet: the worker saves one after each evaluation",
                               style="dim"))
            return
        parts: list[Any] = [Text(ckpt.path, style="dim")]
        if ckpt.metrics:
            parts.append(recall_table(ckpt.metrics, compact=True,
                                      title=f"dev Recall@K (%) at step {ckpt.step}"))
        evaluation = self.results.get(ckpt.path)
        if evaluation is not None:
            parts.extend(evaluation.show(ckpt))
        detail.update(Group(*parts))

    @on(KeyedTable.RowHighlighted, "#ckpt-table")
    def _row_highlighted(self) -> None:
        self._show_detail()

    @on(KeyedTable.RowSelected, "#ckpt-table")
    def _row_chosen(self, event: KeyedTable.RowSelected) -> None:
        event.stop()
        self.action_search_with()

    # ---- actions

    def _require(self) -> store.Checkpoint | None:
        """The selected checkpoint; None (with a notice) when there is none or an evaluation or
        export still runs."""
        ckpt = self.selected()
        if ckpt is None:
            self.notify("no checkpoint selected", severity="warning")
            return None
        if self.busy:
            self.notify("wait for the running action to finish", severity="warning")
            return None
        return ckpt

    def action_evaluate(self) -> None:
        ckpt = self._require()
        if ckpt is not None:
            self.busy = True
            self.notify(f"evaluating step {ckpt.step} on the test split …")
            self._evaluate(ckpt)

    @work(thread=True, group="ckpt-action")
    def _evaluate(self, ckpt: store.Checkpoint) -> None:
        from nlmm.eval.evaluate import evaluate_target

        try:
            result = evaluate_target(ckpt.path, split="test")
        except ACTION_ERRORS as exc:
            self.post_message(self.ActionFailed("cannot evaluate the checkpoint", str(exc)))
        else:
            self.post_message(self.Evaluated(ckpt, result))

    @on(Evaluated)
    def _evaluated(self, message: Evaluated) -> None:
        ckpt = message.ckpt
        self.busy = False
        self.results[ckpt.path] = Evaluation(ckpt.step, message.result)
        self._show_detail()
        mean = message.result["metrics"].get("mean_r1")
        self.notify(f"test mean R@1 {recall_cell(mean)} at step {ckpt.step}")

    def action_export(self) -> None:
        ckpt = self._require()
        if ckpt is not None:
            self.busy = True
            self._export(ckpt)

    @work(thread=True, group="ckpt-action")
    def _export(self, ckpt: store.Checkpoint) -> None:
        from nlmm.inference.export import export_bundle

        try:
            # the folder is this checkpoint's own (kind and step): exporting it again rewrites
            # the same bundle
            folder = export_bundle(ckpt.path, export_folder(ckpt), force=True)
        except ACTION_ERRORS as exc:
            self.post_message(self.ActionFailed("cannot export the checkpoint", str(exc)))
        else:
            self.post_message(self.Exported(folder))

    @on(Exported)
    def _exported(self, message: Exported) -> None:
        self.busy = False
        self.notify(f"exported to {message.folder}")

    @on(ActionFailed)
    def _action_failed(self, message: ActionFailed) -> None:
        self.busy = False
        self.dash.notify_error(message.title, message.error)

    def action_resume(self) -> None:
        ckpt = self._require()
        if ckpt is None or self.run is None:
            return
        run = self.run
        if run.status in store.ACTIVE_STATUSES:
            self.notify(f"run {run.name} is {run.status}; stop it before resuming",
                        severity="warning")
            return
        last = max(self.checkpoints.values(), key=lambda c: (c.step, c.id))
        if ckpt.id != last.id:
            self.notify(f"resuming continues from the run's latest checkpoint (step {last.step})")
        if run.status != store.RunStatus.FINISHED:
            self.post_message(self.ResumeRequested(run.name, None))
            return

        def resume_for(epochs: int | None) -> None:  # a finished run needs epochs to train on
            if epochs is not None:
                self.post_message(self.ResumeRequested(run.name, epochs))

        self.app.push_screen(MoreEpochsScreen(run.name, run.epochs_total or run.epoch), resume_for)

    def action_search_with(self) -> None:
        ckpt = self.selected()
        if ckpt is None:
            self.notify("no checkpoint selected", severity="warning")
        else:
            self.post_message(self.SearchRequested(Path(ckpt.path)))
