"""A manifest's rows, from CSV / TSV / TXT (separator detected), JSONL or Parquet.

`read_table` returns the column names and (where, row) pairs, `where` naming the line or row
for defects. Lines that cannot be read are defects; a file that cannot be read at all is an
NlmmError.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from nlmm.data.corpora.base import Defect, read_lines, where
from nlmm.errors import NlmmError

SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".parquet")
SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}
PREFERRED = {".tsv": "\t", ".csv": ","}
# Enough lines to see the separator; csv.Sniffer is not used: it picks the comma inside a
# quoted caption ("a dog, running") over the tab or semicolon that separates the fields.
SAMPLE_LINES = 50

Rows = list[tuple[str, dict]]


def _split(line: str, sep: str) -> list[str]:
    return next(csv.reader([line], delimiter=sep))


def separator(path: Path, lines: list[str], known: set[str]) -> str:
    """The separator that splits the header into >1 fields and the most sampled lines into as
    many; ties go to the one whose header names more `known` columns, then to the suffix's."""
    sample = lines[:SAMPLE_LINES + 1]
    scored = []
    for order, sep in enumerate(SEPARATORS):
        header = _split(sample[0], sep)
        if len(header) > 1:
            agree = sum(len(_split(line, sep)) == len(header) for line in sample)
            names = sum(h.strip().lower() in known for h in header)
            scored.append((agree, names, PREFERRED.get(path.suffix.lower()) == sep, -order, sep))
    if not scored:
        raise NlmmError(f"the header of {path} ({sample[0][:80]!r}) is one column with tab, "
                        f"comma, semicolon and pipe: write a header line naming at least a text "
                        f"and an image or audio column, separated by one of these.")
    return max(scored)[-1]


def _delimited(path: Path, known: set[str], defects: list[Defect],
               notes: list[str]) -> tuple[list[str], Rows]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise NlmmError(f"{path} is empty; write a header line and one row per caption.")
    sep = separator(path, lines, known)
    notes.append(f"separator: {SEPARATORS[sep]} (detected)")
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    header = [h.strip() for h in next(r for r in reader if r)]
    rows: Rows = []
    bad: list[tuple[int, int]] = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            bad.append((reader.line_num, len(row)))
        else:
            rows.append((where(path, reader.line_num), dict(zip(header, row, strict=True))))
    if len(bad) > len(rows):
        lineno, n = bad[0]
        raise NlmmError(f"{path.name}:{lineno} has {n} fields where the header has "
                        f"{len(header)} ({SEPARATORS[sep]}-separated), and so do {len(bad)} of "
                        f"{len(bad) + len(rows)} lines: the file mixes separators; save it again "
                        f"with one separator throughout.")
    defects.extend(Defect("malformed_line", where(path, lineno), f"has {n} fields, the header "
                          f"{len(header)} ({SEPARATORS[sep]}-separated: a stray or different "
                          f"separator?); line skipped") for lineno, n in bad)
    return header, rows


def _jsonl(path: Path, defects: list[Defect]) -> tuple[list[str], Rows]:
    columns: dict[str, None] = {}
    rows: Rows = []
    for lineno, line in read_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            defects.append(Defect("malformed_line", where(path, lineno), f"not JSON ({exc.msg}); "
                                  f"line skipped"))
            continue
        if not isinstance(obj, dict):
            defects.append(Defect("malformed_line", where(path, lineno), "not a JSON object; "
                                  "line skipped"))
            continue
        columns.update(dict.fromkeys(obj))
        rows.append((where(path, lineno), obj))
    return list(columns), rows


def _parquet(path: Path) -> tuple[list[str], Rows]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise NlmmError(f"reading {path.name} needs pyarrow: pip install pyarrow.") from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise NlmmError(f"{path} is not a readable Parquet file ({exc}); write it again.") from exc
    return table.column_names, [(f"{path.name} row {i}", row)
                                for i, row in enumerate(table.to_pylist(), 1)]


def read_table(path: Path, known: set[str], defects: list[Defect],
               notes: list[str]) -> tuple[list[str], Rows]:
    """(columns, rows) of the manifest; `known` column names help pick a CSV's separator."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path, defects)
    if suffix == ".parquet":
        return _parquet(path)
    if suffix in SUFFIXES:
        return _delimited(path, known, defects, notes)
    raise NlmmError(f"{path.name} is not a manifest nlmm reads: use a .csv, .tsv, .txt, .jsonl "
                    f"or .parquet file.")
