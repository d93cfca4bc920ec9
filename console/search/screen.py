"""Query a trained checkpoint with text, an image file or a WAV file and list what it retrieves.

Queries go through `nlmm.search.engine.Searcher.query`, the function behind `nlmm search`; the app's
SearcherCache keeps the last loaded Searcher so only the first query of a checkpoint pays for
loading the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, Input, Label, Select
from textual.worker import get_current_worker

from console.errors import ACTION_ERRORS
from console.widgets.key_footer import KeyFooter
from console.widgets.keyed_table import KeyedTable, Row
from nlmm.errors import NlmmError

if TYPE_CHECKING:
    from console.search.searchers import SearcherCache
    from nlmm.search.engine import SearchHit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
AUDIO_SUFFIXES = (".wav",)
TARGETS = (("auto", "auto"), ("images", "image"), ("captions", "text"), ("spoken captions", "audio"))
COLUMNS = (("rank", "#"), ("score", "score"), ("modality", "kind"), ("file", "file"),
           ("caption", "caption"))
RESULTS = 10


@dataclass(frozen=True)
class Query:
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None

    @property
    def kind(self) -> str:
        return "image" if self.image else "audio" if self.audio else "text"


def parse_query(raw: str) -> Query:
    """A path to an image or WAV file queries with that file; anything else is a text query."""
    value = raw.strip()
    if not value:
        raise NlmmError("the query is empty; type a few words or the path to an image or WAV file.")
    suffix = Path(value).suffix.lower()
    if suffix in IMAGE_SUFFIXES + AUDIO_SUFFIXES:
        path = Path(value).expanduser()
        if not path.is_file():
            raise NlmmError(f"query file {path} does not exist; check the path or type a text query.")
        return Query(image=path) if suffix in IMAGE_SUFFIXES else Query(audio=path)
    return Query(text=value)


def hit_row(hit: SearchHit) -> Row:
    file = Path(hit.path).name if hit.path else ("-" if hit.modality == "text" else hit.item)
    return (str(hit.rank), (str(hit.rank), f"{hit.score:.3f}", hit.modality, file,
                            hit.caption or ""))


@runtime_checkable
class OffersARun(Protocol):
    """A screen with a run in view: Ctrl+F's search starts with that run's best checkpoint."""

    @property
    def search_run(self) -> str | None: ...


class SearchScreen(Screen[None]):
    # What its search worker reports; a failure is shown in the status line, under the query
    # that caused it, not as a notification.

    @dataclass
    class Found(Message):
        """`checkpoint` retrieved `hits` in `seconds` (model loading included)."""

        bubble = False
        hits: list[SearchHit]
        checkpoint: str
        seconds: float

    @dataclass
    class SearchFailed(Message):
        """The search could not run; `error` says why and what to do."""

        bubble = False
        error: str

    HELP = ("Type words, or the path to a .jpg/.png or .wav file, and press Enter: what you type "
            "goes into the query wherever the focus is. Ctrl+T picks what to retrieve (auto: "
            "images for text and audio queries, captions for images).")

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+t", "focus_target", "Target"),
        Binding("ctrl+l", "focus_query", "Query", show=False),
    ]

    def __init__(self, searchers: SearcherCache, run: str | None = None,
                 checkpoint: Path | None = None) -> None:
        super().__init__()
        self.searchers = searchers
        self.run_ref = run
        self.checkpoint = checkpoint
        self.last_query: Query | None = None  # searched again when the target changes
        self.hits: list[SearchHit] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="search-bar"):
            # not select_on_focus: a character typed elsewhere is put into the field before the
            # focus arrives there, and selecting it then would let the next one replace it
            yield Input(placeholder="text, or path to an image / WAV file", id="search-query",
                        select_on_focus=False)
            yield Select[str](TARGETS, value="auto", allow_blank=False, id="search-target")
        yield Label(self._model_label(), id="search-model")
        yield KeyedTable(COLUMNS, id="search-results", flex="caption")
        yield Label("Enter searches; the first query of a model loads it and indexes its gallery",
                    id="search-status")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.sub_title = "search"
        self.query_one("#search-query", Input).focus()

    def _model_label(self) -> str:
        if self.checkpoint is not None:
            return f"model: {self.checkpoint}"
        if self.run_ref is not None:
            return f"model: best checkpoint of run {self.run_ref}"
        return "model: best checkpoint of the latest finished run"

    def action_focus_target(self) -> None:
        self.query_one("#search-target", Select).focus()

    def action_focus_query(self) -> None:
        self.query_one("#search-query", Input).focus()

    def on_key(self, event: events.Key) -> None:
        """A character typed while the focus is off the query field (after Ctrl+T and Tab, or a
        click on the results) goes into the field: a typed path must never fire the app's
        one-letter shortcuts (n would open "start a run"). Keys the focused widget binds itself
        (Space opens the target list) keep their meaning."""
        field = self.query_one("#search-query", Input)
        if not event.is_printable or event.character is None or self.focused is field:
            return
        bound = self.active_bindings.get(event.key)
        if bound is not None and not isinstance(bound.node, (Screen, App)):
            return
        event.stop()
        event.prevent_default()
        field.focus()
        field.insert_text_at_cursor(event.character)

    @on(Input.Submitted, "#search-query")
    def _query_submitted(self, event: Input.Submitted) -> None:
        try:
            query = parse_query(event.value)
        except NlmmError as exc:
            self.query_one("#search-status", Label).update(str(exc))
            return
        self.last_query = query
        self._start_search(query)

    @on(Select.Changed, "#search-target")
    def _target_changed(self) -> None:
        if self.last_query is not None:
            self._start_search(self.last_query)

    def _start_search(self, query: Query) -> None:
        target = self.query_one("#search-target", Select).value
        self.query_one("#search-status", Label).update(f"searching ({query.kind} query) …")
        self._search(query, None if target == "auto" else str(target))

    @work(thread=True, exclusive=True, group="search")
    def _search(self, query: Query, target: str | None) -> None:
        started = time.perf_counter()
        try:
            searcher = self.searchers.get(self.checkpoint, self.run_ref)
            hits = searcher.query(text=query.text, image=query.image, audio=query.audio,
                                  target=target, k=RESULTS)
        except ACTION_ERRORS as exc:
            if not get_current_worker().is_cancelled:
                self.post_message(self.SearchFailed(str(exc)))
            return
        if get_current_worker().is_cancelled:
            return  # a newer search (another query or target) replaced this one
        self.post_message(self.Found(hits, str(searcher.loaded.checkpoint_path),
                                     time.perf_counter() - started))

    @on(SearchFailed)
    def _show_error(self, message: SearchFailed) -> None:
        self.query_one("#search-status", Label).update(message.error)

    @on(Found)
    def _show_hits(self, message: Found) -> None:
        self.hits = message.hits
        self.query_one("#search-results", KeyedTable).sync([hit_row(hit) for hit in self.hits])
        self.query_one("#search-model", Label).update(f"model: {message.checkpoint}")
        self.query_one("#search-status", Label).update(
            f"{len(self.hits)} results in {message.seconds:.2f} s" if self.hits else "no results")
