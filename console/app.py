"""`nlmm dash`: the Textual app, its app-wide keys, and the only place that starts or stops runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.message import Message

from console.checkpoints.screen import CheckpointsScreen
from console.dialogs.confirm import ConfirmScreen
from console.dialogs.help import HelpScreen
from console.dialogs.new_run import NewRunForm, NewRunScreen
from console.errors import ACTION_ERRORS
from console.run.screen import RunScreen
from console.runs.screen import RunsScreen
from console.search.screen import OffersARun, SearchScreen
from console.search.searchers import SearcherCache
from nlmm import store
from nlmm.paths import DB_URL_ENV

if TYPE_CHECKING:
    from nlmm.train.request import TrainRequest

THEMES = ("textual-dark", "textual-light")
APP_HELP = ("Everywhere: ? or F1 help, t light/dark theme, s search, n new run, q quit, Esc back; "
            "Ctrl+P opens the command palette. Tables and tabs also take the mouse.")


class NlmmDash(App[None]):
    """Runs → run → checkpoints → search, refreshed from the store every `poll_s` seconds.

    Screens ask for what outlives them (starting, resuming or stopping a run, a search on a
    model) by posting their own messages, handled here; the app's workers answer with the
    messages below. `clock` gives the wall time used for elapsed and ETA; tests pass a fixed one
    so screens render the same on every run.
    """

    CSS_PATH = Path(__file__).with_name("nlmm.tcss")
    TITLE = "nlmm"
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False),
        Binding("s", "search", "Search"),
        Binding("n", "new_run", "New run", show=False),
        Binding("t", "toggle_theme", "Theme", show=False),
        Binding("q", "quit", "Quit"),
    ]

    @dataclass
    class RunLaunched(Message):
        """A launch worker started `run`; `note` tells the user, `open_run` shows its screen."""

        run: store.Run
        note: str
        open_run: bool

    @dataclass
    class RunStopped(Message):
        """A stop worker ended run `name`, which is now `status`."""

        name: str
        status: str

    @dataclass
    class ActionFailed(Message):
        """A launch or stop worker failed: `title` says what could not be done, `error` why."""

        title: str
        error: str

    def __init__(self, run_id: int | None = None, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.time, theme: str = THEMES[0]) -> None:
        super().__init__()
        self.initial_run = run_id
        self.poll_s = poll_s
        self.clock = clock
        self.theme = theme
        self.searchers = SearcherCache()

    def on_mount(self) -> None:
        self.push_screen(RunsScreen())
        if self.initial_run is not None:
            self.push_screen(RunScreen(self.initial_run))

    def notify_error(self, title: str, error: str) -> None:
        """How every failed action shows: `title` says what could not be done ("cannot stop
        the run"), `error` is the error's own sentence, which says what to do next."""
        self.notify(error, title=title, severity="error")

    # ---- app-wide actions

    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpScreen):
            return
        # Textual's own keys (focus cycling, copy) are left out: they work the same in every app.
        ours = {(b.action, b.description) for b in (*self.BINDINGS, *screen.BINDINGS)
                if isinstance(b, Binding)}
        keys = [(self.get_key_display(active.binding), active.binding.description)
                for active in screen.active_bindings.values()
                if (active.binding.action, active.binding.description) in ours]
        about = getattr(screen, "HELP", "") + "\n\n" + APP_HELP
        self.push_screen(HelpScreen(screen.sub_title or self.title, about, keys))

    def action_toggle_theme(self) -> None:
        self.theme = THEMES[1] if self.theme == THEMES[0] else THEMES[0]

    def action_search(self) -> None:
        """Search with the best checkpoint of the screen's run (`OffersARun`), or of the latest
        finished run."""
        run = self.screen.search_run if isinstance(self.screen, OffersARun) else None
        self.push_screen(SearchScreen(self.searchers, run=run))

    @on(CheckpointsScreen.SearchRequested)
    def _search_checkpoint(self, request: CheckpointsScreen.SearchRequested) -> None:
        self.push_screen(SearchScreen(self.searchers, checkpoint=request.checkpoint))

    # ---- starting and stopping runs (the launcher blocks, so it runs in worker threads)

    def action_new_run(self) -> None:
        self.push_screen(NewRunScreen(), self._start_run)

    def _start_run(self, form: NewRunForm | None) -> None:
        if form is None:
            return
        from nlmm.train.request import TrainRequest  # torch: loaded when a run is started

        self.notify(f"starting a {form.config} run …")
        request = TrainRequest(data=form.data, synthetic=form.synthetic, config=form.config,
                               overrides=form.overrides, device=form.device, name=form.name)
        self._launch(request, open_run=True)

    @on(CheckpointsScreen.ResumeRequested)
    def _resume(self, request: CheckpointsScreen.ResumeRequested) -> None:
        from nlmm.train.request import TrainRequest

        self._launch(TrainRequest(resume=request.run, add_epochs=request.add_epochs),
                     open_run=False)

    @work(thread=True, group="launch")
    def _launch(self, request: TrainRequest, open_run: bool) -> None:
        from nlmm.train.launcher import launch

        try:
            run = launch(request)
        except ACTION_ERRORS as exc:
            verb = "resume" if request.resume else "start"
            self.post_message(self.ActionFailed(f"cannot {verb} the run", str(exc)))
            return
        if request.resume:
            more = f" for {request.add_epochs} more epochs" if request.add_epochs else ""
            note = f"resumed {run.name}{more}; its worker is starting"
        else:
            note = f"started run {run.name}"
        self.post_message(self.RunLaunched(run, note, open_run))

    @on(RunLaunched)
    def _launched(self, message: RunLaunched) -> None:
        self.notify(message.note)
        if message.open_run:
            self.push_screen(RunScreen(message.run.id))

    @on(RunsScreen.StopRequested)
    @on(RunScreen.StopRequested)
    def _confirm_stop(self, request: RunsScreen.StopRequested | RunScreen.StopRequested) -> None:
        """Ask, then stop the run (its worker checkpoints first); runs that ended are left alone."""
        run = request.run
        if run.status not in store.ACTIVE_STATUSES:
            self.notify(f"run {run.name} is {run.status}; there is nothing to stop",
                        severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.notify(f"stopping {run.name}: the worker saves a checkpoint first …")
                self._stop(run.name)

        self.push_screen(ConfirmScreen(f"Stop run {run.name}? Its worker saves a checkpoint "
                                       "and ends as 'stopped'."), answered)

    @work(thread=True, group="stop")
    def _stop(self, name: str) -> None:
        from nlmm.train.launcher import stop

        try:
            status = stop(name)
        except ACTION_ERRORS as exc:
            self.post_message(self.ActionFailed("cannot stop the run", str(exc)))
            return
        self.post_message(self.RunStopped(name, status))

    @on(RunStopped)
    def _stopped(self, message: RunStopped) -> None:
        self.notify(f"run {message.name} is {message.status}")

    @on(ActionFailed)
    def _action_failed(self, message: ActionFailed) -> None:
        self.notify_error(message.title, message.error)


def run_dashboard(db_url: str | None = None, run: str | None = None) -> None:
    """Open the dashboard on the store at `db_url` (default: NLMM_DB_URL or runs/nlmm.db).

    The URL goes into the environment, so runs started from the dash write to the same store.
    """
    if db_url:
        os.environ[DB_URL_ENV] = db_url
    store.get_engine()  # fail here, with the store's own message, before the screen opens
    run_id = store.get_run(run).id if run else None
    NlmmDash(run_id=run_id).run()
