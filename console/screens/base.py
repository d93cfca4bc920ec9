"""A screen that polls the store on a timer, off the event loop, and applies what it read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy.exc import SQLAlchemyError
from textual.screen import Screen

from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from console.app import NlmmDash

Snapshot = TypeVar("Snapshot")

# Failures a poll can hit while workers write: shown once as a notification, polling goes on.
POLL_ERRORS = (NlmmError, SQLAlchemyError, OSError)


class PollingScreen(Screen[None], Generic[Snapshot]):
    """Calls `fetch()` in a thread every `app.poll_s` seconds while visible, then `apply()`.

    Only one fetch is in flight at a time, so a slow store delays refreshes instead of queueing
    them, and the event loop never waits on the database.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fetching = False
        self._again = False
        self._last_error: str | None = None
        self.polls = 0  # completed fetches, for tests and the benchmark to wait on

    @property
    def dash(self) -> NlmmDash:
        return cast("NlmmDash", self.app)

    def on_mount(self) -> None:
        self.set_interval(self.dash.poll_s, self.poll)
        self.poll()

    def on_screen_resume(self) -> None:
        self.poll()

    def poll(self) -> None:
        """Start a fetch now; when one is running, start another as soon as it ends."""
        if self._fetching:
            self._again = True
            return
        if not self.is_current:
            return
        self._fetching = True
        self.run_worker(self._fetch_in_thread, thread=True, group="poll", exit_on_error=False)

    def fetch(self) -> Snapshot:
        """Read what the screen shows; runs in a worker thread, so it must not touch widgets."""
        raise TypeError(f"{type(self).__name__} must define fetch(), the read of its data")

    def apply(self, snapshot: Snapshot) -> None:
        """Show a snapshot; runs on the event loop."""
        raise TypeError(f"{type(self).__name__} must define apply(), the display of its data")

    def _fetch_in_thread(self) -> None:
        try:
            snapshot = self.fetch()
        except POLL_ERRORS as exc:
            self.app.call_from_thread(self._failed, str(exc))
        else:
            self.app.call_from_thread(self._applied, snapshot)

    def _applied(self, snapshot: Snapshot) -> None:
        self._fetching = False
        self._again = False
        self._last_error = None
        if self.is_attached:
            self.apply(snapshot)
        self.polls += 1

    def _failed(self, message: str) -> None:
        self._fetching = False
        if message != self._last_error:
            self.notify(message, title="cannot read the store", severity="error")
        self._last_error = message
        self.polls += 1
