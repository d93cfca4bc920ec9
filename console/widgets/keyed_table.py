"""A row-cursor DataTable whose rows are replaced in place by key on every refresh."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

Cell = str | Text
Row = tuple[str, Sequence[Cell]]


class KeyedTable(DataTable[Cell]):
    """`sync()` touches only the cells that changed and keeps the cursor on the same row key,
    so a table refreshed every second neither flickers nor loses the user's place.

    Column widths are computed here, when rows arrive, instead of by DataTable's own lazy
    sizing on idle, so a table is laid out the same however busy the machine is.
    """

    def __init__(self, columns: Sequence[tuple[str, str]], id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._column_spec = list(columns)
        self._rows: dict[str, tuple[Cell, ...]] = {}
        self._widths: list[int] = []

    def on_mount(self) -> None:
        if not self._widths:
            self._set_columns(self._fitting_widths({}))

    @property
    def keys(self) -> list[str]:
        return list(self._rows)

    @property
    def current_key(self) -> str | None:
        """Key of the row under the cursor, None when the table is empty."""
        if self.row_count == 0:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def _fitting_widths(self, rows: Mapping[str, Sequence[Cell]]) -> list[int]:
        return [max([cell_len(label), *(cell_len(str(cells[i])) for cells in rows.values())])
                for i, (_key, label) in enumerate(self._column_spec)]

    def _set_columns(self, widths: list[int]) -> None:
        self.clear(columns=True)
        for (key, label), width in zip(self._column_spec, widths):
            self.add_column(label, key=key, width=width)
        self._widths = widths
        self._rows = {}

    def sync(self, rows: Sequence[Row]) -> None:
        fresh = {key: tuple(cells) for key, cells in rows}
        keep = self.current_key
        widths = self._fitting_widths(fresh)
        if widths != self._widths:
            self._set_columns(widths)
        if list(fresh) == list(self._rows):
            column_keys = [key for key, _label in self._column_spec]
            for key, cells in fresh.items():
                for column, value, before in zip(column_keys, cells, self._rows[key]):
                    if value != before:
                        self.update_cell(key, column, value)
            self._rows = fresh
            return
        self.clear()
        for key, cells in fresh.items():
            self.add_row(*cells, key=key)
        self._rows = fresh
        if keep in fresh:
            self.move_cursor(row=self.get_row_index(keep), animate=False)
