"""Modal dialogs: the help overlay, a yes/no confirmation, the epochs to add to a finished run,
and the new-run form."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from console.widgets.ticks import TickBox

from nlmm.config import CONFIG_DIR


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


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Label(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes (y)", variant="error", id="confirm-yes")
                yield Button("No (n)", variant="primary", id="confirm-no")

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed, "#confirm-yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def _no(self) -> None:
        self.dismiss(False)


class MoreEpochsScreen(ModalScreen[int | None]):
    """How many more epochs a finished run should train when resumed (`--epochs N`)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, run_name: str, epochs_done: int) -> None:
        super().__init__()
        self.run_name = run_name
        self.epochs_done = epochs_done

    def compose(self) -> ComposeResult:
        with Vertical(id="epochs-box") as box:
            box.border_title = f"resume {self.run_name}"
            box.border_subtitle = "Enter resumes · Esc cancels"
            yield Label(f"{self.run_name} finished its {self.epochs_done} epochs. How many more "
                        "epochs should it train?", id="epochs-question")
            yield Input("1", type="integer", id="epochs-input", compact=True)
            yield Label("", id="epochs-error")

    def on_mount(self) -> None:
        self.query_one("#epochs-input", Input).focus()

    @on(Input.Submitted, "#epochs-input")
    def _submit(self, event: Input.Submitted) -> None:
        try:
            epochs = int(event.value)
        except ValueError:  # empty, or only a sign
            epochs = 0
        if epochs < 1:
            self.query_one("#epochs-error", Label).update("give a whole number of epochs, 1 or more")
            return
        self.dismiss(epochs)

    def action_cancel(self) -> None:
        self.dismiss(None)


def config_names() -> list[str]:
    """Names of the YAML configs `nlmm train --config` accepts by name (./configs first)."""
    names: dict[str, None] = {}
    for folder in (Path.cwd() / "configs", CONFIG_DIR):
        for path in sorted(folder.glob("*.yaml")):
            names.setdefault(path.stem)
    return list(names)


@dataclass(frozen=True)
class NewRunForm:
    """What the new-run dialog collected; the app turns it into a launcher TrainRequest."""

    config: str
    synthetic: bool
    data: Path | None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    device: str = "auto"


DEVICES = (("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"))


class NewRunScreen(ModalScreen[NewRunForm | None]):
    """Start a training run from a config, as `nlmm train flickr8k --detach` would."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "start", "Start")]

    def compose(self) -> ComposeResult:
        names = config_names()
        with Vertical(id="newrun-box") as box:
            box.border_title = "start a run"
            box.border_subtitle = "Ctrl+S starts · Esc cancels"
            with Grid(id="newrun-grid"):
                yield Label("config")
                yield Select([(n, n) for n in names], value=names[0] if names else Select.BLANK,
                             allow_blank=not names, id="newrun-config", compact=True)
                yield Label("corpus")
                yield TickBox("offline synthetic corpus", id="newrun-synthetic", compact=True)
                yield Label("data folder")
                yield Input(placeholder="default: data/flickr8k (data/synth)", id="newrun-data",
                            compact=True)
                yield Label("overrides")
                yield Input(placeholder="key=value … e.g. train.epochs=3", id="newrun-overrides",
                            compact=True)
                yield Label("name")
                yield Input(placeholder="default: generated", id="newrun-name", compact=True)
                yield Label("device")
                yield Select(DEVICES, value="auto", allow_blank=False, id="newrun-device",
                             compact=True)
            yield Label("", id="newrun-error")
            with Horizontal(id="newrun-buttons"):
                yield Button("Start", variant="primary", id="newrun-start")
                yield Button("Cancel", id="newrun-cancel")

    def form(self) -> NewRunForm:
        config = self.query_one("#newrun-config", Select).value
        if not isinstance(config, str):
            raise ValueError("pick a config")
        data = self.query_one("#newrun-data", Input).value.strip()
        name = self.query_one("#newrun-name", Input).value.strip()
        overrides = shlex.split(self.query_one("#newrun-overrides", Input).value)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"override {bad[0]!r} is not key=value")
        return NewRunForm(config=config,
                          synthetic=self.query_one("#newrun-synthetic", Checkbox).value,
                          data=Path(data).expanduser() if data else None, overrides=overrides,
                          name=name or None,
                          device=str(self.query_one("#newrun-device", Select).value))

    @on(Button.Pressed, "#newrun-start")
    def action_start(self) -> None:
        try:
            form = self.form()
        except ValueError as exc:
            self.query_one("#newrun-error", Label).update(str(exc))
            return
        self.dismiss(form)

    @on(Button.Pressed, "#newrun-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
