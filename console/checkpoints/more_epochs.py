"""The epochs to add to a finished run before it is resumed."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


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
