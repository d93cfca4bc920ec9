"""The help overlay: the keys of the screen below and what that screen is for."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    """The keys of the screen below (and the app's), with a line on what that screen is for."""

    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "Close")]

    def __init__(self, title: str, about: str, keys: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.about = about
        self.keys = list(keys)

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        with VerticalScroll(id="help-box") as box:
            box.border_title = f"help · {self.title_text}"
            box.border_subtitle = "Esc closes"
            yield Static(Text(self.about), id="help-about")
            yield Static(table, id="help-keys")
