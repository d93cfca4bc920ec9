"""Checkboxes whose mark is drawn only when ticked, so their state reads without colour.

Textual's Checkbox and SelectionList draw the same `▐X▌` ticked or not and tell them apart by
colour alone, which a monochrome terminal or a colour-blind user cannot see. These draw `▐X▌`
ticked and `▐ ▌` unticked.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from rich.segment import Segment
from textual.strip import Strip
from textual.widgets import Checkbox, SelectionList
from textual.widgets.option_list import OptionDoesNotExist

T = TypeVar("T")
TICKED = Checkbox.BUTTON_INNER  # what both widgets draw, ticked or not
UNTICKED = " "


class TickBox(Checkbox):
    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802  (the name Checkbox reads its mark from)
        return TICKED if self.value else UNTICKED


class TickList(SelectionList[T], Generic[T]):
    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        try:
            option = self.get_option_at_index(self.scroll_offset.y + y)
        except OptionDoesNotExist:
            return strip
        segments = list(strip)
        # the button's three cells come first: left side, mark, right side
        if option.value in self.selected or len(segments) < 2 or \
                segments[1].text != TICKED:
            return strip
        segments[1] = Segment(UNTICKED, segments[1].style)
        return Strip(segments, strip.cell_length)
