"""The footer every screen shows its keys in."""

from __future__ import annotations

from textual.widgets import Footer


class KeyFooter(Footer):
    """Compact and without the Ctrl+P entry (the help overlay names it), so that the keys of the
    busiest screen, the runs list, fit in 80 columns."""

    def __init__(self) -> None:
        super().__init__(compact=True, show_command_palette=False)
