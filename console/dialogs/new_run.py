"""The new-run form: a config, a corpus and overrides, as `nlmm train --detach` takes them."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select

from console.widgets.ticks import TickBox
from nlmm.config import CONFIG_DIR


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
