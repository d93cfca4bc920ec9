"""A row-cursor DataTable whose rows are replaced in place by key on every refresh."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.widgets import DataTable

Cell = str | Text
Row = tuple[str, Sequence[Cell]]
# (index in the column spec, width) of each column on screen, left to right
Layout = list[tuple[int, int]]

FLEX_MIN = 12  # the flex column is never cut below this many cells (or its label)


class KeyedTable(DataTable[Cell]):
    """`sync()` touches only the cells that changed and keeps the cursor on the same row key,
    so a table refreshed every second neither flickers nor loses the user's place.

    Column widths are computed here, when rows arrive or the table is resized, instead of by
    DataTable's own lazy sizing on idle, so a table is laid out the same however busy the
    machine is. When the rows are wider than the table, the `optional` columns are hidden in
    the order given, then the `flex` column is narrowed and its cut cells end in "…", so the
    table fits its width instead of scrolling sideways.
    """

    def __init__(self, columns: Sequence[tuple[str, str]], id: str | None = None, *,
                 flex: str | None = None, optional: Sequence[str] = ()) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._column_spec = list(columns)
        index = {key: i for i, (key, _label) in enumerate(self._column_spec)}
        self._flex = None if flex is None else index[flex]
        self._optional = [index[key] for key in optional]
        self._rows: dict[str, tuple[Cell, ...]] = {}
        self._layout: Layout = []

    def on_mount(self) -> None:
        if not self._layout:
            self._set_columns(self._fit({}))

    def on_resize(self, _event: events.Resize) -> None:
        self._show(dict(self._rows))

    @property
    def keys(self) -> list[str]:
        return list(self._rows)

    @property
    def current_key(self) -> str | None:
        """Key of the row under the cursor, None when the table is empty."""
        if self.row_count == 0:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def _room(self, n_rows: int) -> int | None:
        """Cells across that the columns may take; None before the table is laid out."""
        if not self.size.width:
            return None
        scrollbar = self.styles.scrollbar_size_vertical if n_rows + 1 > self.size.height else 0
        return self.size.width - scrollbar

    def _fit(self, rows: Mapping[str, Sequence[Cell]]) -> Layout:
        natural = [max([cell_len(label), *(cell_len(str(cells[i])) for cells in rows.values())])
                   for i, (_key, label) in enumerate(self._column_spec)]
        widths = dict(enumerate(natural))
        room = self._room(len(rows))

        def overflow() -> int:
            return sum(widths.values()) + 2 * self.cell_padding * len(widths) - (room or 0)

        if room is not None:
            for index in self._optional:
                if overflow() <= 0:
                    break
                del widths[index]
            if self._flex in widths and overflow() > 0:
                floor = max(FLEX_MIN, cell_len(self._column_spec[self._flex][1]))
                widths[self._flex] = max(min(floor, natural[self._flex]),
                                         natural[self._flex] - overflow())
        return sorted(widths.items())

    def _cell(self, index: int, width: int, value: Cell) -> Cell:
        if index != self._flex:
            return value
        # Plain text, not markup: a caption or run name is shown as written.
        text = value.copy() if isinstance(value, Text) else Text(value)
        text.truncate(width, overflow="ellipsis")
        return text

    def _set_columns(self, layout: Layout) -> None:
        self.clear(columns=True)
        for index, width in layout:
            key, label = self._column_spec[index]
            self.add_column(label, key=key, width=width)
        self._layout = layout
        self._rows = {}

    def sync(self, rows: Sequence[Row]) -> None:
        self._show({key: tuple(cells) for key, cells in rows})

    def _show(self, fresh: dict[str, tuple[Cell, ...]]) -> None:
        keep = self.current_key
        layout = self._fit(fresh)
        if layout != self._layout:
            self._set_columns(layout)
        if list(fresh) == list(self._rows):
            for key, cells in fresh.items():
                for index, width in self._layout:
                    if cells[index] != self._rows[key][index]:
                        self.update_cell(key, self._column_spec[index][0],
                                         self._cell(index, width, cells[index]))
            self._rows = fresh
            return
        self.clear()
        for key, cells in fresh.items():
            self.add_row(*(self._cell(index, width, cells[index]) for index, width in self._layout),
                         key=key)
        self._rows = fresh
        if keep in fresh:
            self.move_cursor(row=self.get_row_index(keep), animate=False)
