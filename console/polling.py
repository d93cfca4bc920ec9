"""A screen that polls the store on a timer, off the event loop, and applies what it read."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy.exc import SQLAlchemyError
from textual import on
from textual.message import Message
from textual.screen import Screen

from console.errors import ACTION_ERRORS

if TYPE_CHECKING:
    from console.app import NlmmDash

Snapshot = TypeVar("Snapshot")

# Failures a poll can hit while workers write: shown once as a notification, polling goes on.
POLL_ERRORS = (*ACTION_ERRORS, SQLAlchemyError)


class _AbstractScreenMeta(type(Screen), ABCMeta):  # type: ignore[misc]
    """Textual's widget metaclass with ABC's check that abstract methods are defined."""


class PollingScreen(Screen[None], Generic[Snapshot], metaclass=_AbstractScreenMeta):
    """Calls `fetch()` in a thread every `app.poll_s` seconds while visible, then `apply()`.

    Only one fetch is in flight at a time, so a slow store delays refreshes instead of queueing
    them, and the event loop never waits on the database. Subclasses call `refetch()` when the
    user changes what the screen shows.
    """

    @dataclass
    class Fetched(Message):
        """The fetch worker read `snapshot`."""

        bubble = False
        snapshot: Any

    @dataclass
    class FetchFailed(Message):
        """The fetch worker could not read the store; `error` says why."""

        bubble = False
        error: str

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fetching = False
        self._again = False
        self._last_error: str | None = None
        self.polls = 0  # completed fetches, for tests and the benchmark to wait on

    @property
    def dash(self) -> NlmmDash:
        return cast("NlmmDash", self.app)

    # Textual calls the handler of every class in the MRO, this one after a subclass's own:
    # subclasses do not call super().on_mount().
    def on_mount(self) -> None:
        self.set_interval(self.dash.poll_s, self.poll)

    def on_screen_resume(self) -> None:
        self.poll()  # the first poll too: a screen is resumed when it is first shown

    def poll(self) -> None:
        """Start a fetch now, unless one is in flight (a slow store then skips this tick)."""
        if self._fetching or not self.is_current:
            return
        self._fetching = True
        self.run_worker(self._fetch_in_thread, thread=True, group="poll", exit_on_error=False)

    def refetch(self) -> None:
        """Show a change the user made (a filter, a tab) now: fetch at once, or as soon as the
        fetch in flight ends, since that one may have read the screen's old settings."""
        if self._fetching:
            self._again = True
        else:
            self.poll()

    @abstractmethod
    def fetch(self) -> Snapshot:
        """Read what the screen shows; runs in a worker thread, so it must not touch widgets."""

    @abstractmethod
    def apply(self, snapshot: Snapshot) -> None:
        """Show a snapshot; runs on the event loop."""

    def _fetch_in_thread(self) -> None:
        try:
            snapshot = self.fetch()
        except POLL_ERRORS as exc:
            self.post_message(self.FetchFailed(str(exc)))
        else:
            self.post_message(self.Fetched(snapshot))

    @on(Fetched)
    def _applied(self, message: Fetched) -> None:
        self._last_error = None
        if self.is_attached:
            self.apply(message.snapshot)
        self._fetched()

    @on(FetchFailed)
    def _failed(self, message: FetchFailed) -> None:
        if message.error != self._last_error:
            self.dash.notify_error("cannot read the store", message.error)
        self._last_error = message.error
        self._fetched()

    def _fetched(self) -> None:
        self._fetching = False
        self.polls += 1
        if self._again:
            self._again = False
            self.poll()
