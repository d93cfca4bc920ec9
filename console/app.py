"""`nlmm dash`: the Textual app, its app-wide keys, and the actions that start or stop runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import App
from textual.binding import Binding

from console.messages import SearchRequested, StopRequested
from console.dialogs.confirm import ConfirmScreen
from console.dialogs.help import HelpScreen
from console.dialogs.new_run import NewRunForm, NewRunScreen
from console.run.screen import RunScreen
from console.runs.screen import RunsScreen
from console.search.screen import SearchScreen
from console.search.searchers import SearcherCache
from nlmm import store
from nlmm.errors import NlmmError
from nlmm.paths import DB_URL_ENV

THEMES = ("textual-dark", "textual-light")
APP_HELP = ("Everywhere: ? or F1 help, t light/dark theme, s search, n new run, q quit, Esc back; "
            "Ctrl+P opens the command palette. Tables and tabs also take the mouse.")


class NlmmDash(App[None]):
    """Runs → run → checkpoints → search, refreshed from the store every `poll_s` seconds.

    Screens ask for what outlives them (stopping a run, opening a search on a model) by posting
    the messages in `console.messages`, handled here. `clock` gives the wall time used for
    elapsed and ETA; tests pass a fixed one so screens render the same on every run.
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
        self.post_message(SearchRequested(run=getattr(self.screen, "search_run", None)))

    @on(SearchRequested)
    def open_search(self, request: SearchRequested) -> None:
        self.push_screen(SearchScreen(self.searchers, run=request.run,
                                      checkpoint=request.checkpoint))

    def action_new_run(self) -> None:
        self.push_screen(NewRunScreen(), self._start_run)

    # ---- starting and stopping runs (the launcher blocks, so it runs in worker threads)

    def _start_run(self, form: NewRunForm | None) -> None:
        if form is not None:
            self.notify(f"starting a {form.config} run …")
            self._launch(form)

    @work(thread=True, group="launch")
    def _launch(self, form: NewRunForm) -> None:
        from nlmm.train.launcher import launch
        from nlmm.train.request import TrainRequest

        request = TrainRequest(data=form.data, synthetic=form.synthetic, config=form.config,
                               overrides=form.overrides, device=form.device, name=form.name)
        try:
            run = launch(request)
        except (NlmmError, OSError) as exc:
            self.call_from_thread(self.notify, str(exc), title="cannot start the run",
                                  severity="error")
            return
        self.call_from_thread(self.notify, f"started run {run.name}")
        self.call_from_thread(self.push_screen, RunScreen(run.id))

    @on(StopRequested)
    def confirm_stop(self, request: StopRequested) -> None:
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
        except NlmmError as exc:
            self.call_from_thread(self.notify, str(exc), title="cannot stop the run",
                                  severity="error")
            return
        self.call_from_thread(self.notify, f"run {name} is {status}")


def run_dashboard(db_url: str | None = None, run: str | None = None) -> None:
    """Open the dashboard on the store at `db_url` (default: NLMM_DB_URL or runs/nlmm.db).

    The URL goes into the environment, so runs started from the dash write to the same store.
    """
    if db_url:
        os.environ[DB_URL_ENV] = db_url
    store.get_engine()  # fail here, with the store's own message, before the screen opens
    run_id = store.get_run(run).id if run else None
    NlmmDash(run_id=run_id).run()
