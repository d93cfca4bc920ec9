"""The footer every screen shows its keys in."""

from __future__ import annotations

from textual.widgets import Footer


def key_footer() -> Footer:
    """Compact and without the Ctrl+P entry (the help overlay names it), so that the keys of the
    busiest screen, the runs list, fit in 80 columns."""
    return Footer(compact=True, show_command_palette=False)
