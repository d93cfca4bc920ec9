"""`--help` that reads at 80 columns.

Typer's Rich panels squeeze four name columns and a type column into 80 columns, which cuts
option names (`--data,--data_d…`) and shows Python types (`<bool>`, `<list[str]>`). The CLI
uses the plain layout instead (`rich_markup_mode=None` on its apps) and, through
`ReadableCommand`, shows each value as what to type: a declared metavar (DIR, KEY=VALUE), the
choices ([auto|cpu|cuda]), N for a whole number, PATH, else the parameter's name in capitals.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any

import typer
from typer.core import TyperCommand

# How typer shows a value's type at the end of an option's names: " <int range>", " <a|b>".
_SHOWN_TYPE = re.compile(r" <([^<>]*)>$")
_BY_TYPE = {"int": "N", "int range": "N", "path": "PATH"}


def metavar_of(param: Any, shown_type: str = "") -> str:
    """What to type for `param`, given the type typer would show for it (`int range`, `a|b`)."""
    if param.metavar:
        return param.metavar
    if "|" in shown_type:
        return f"[{shown_type}]"
    return _BY_TYPE.get(shown_type) or param.name.strip("_").upper()


def write_rows(formatter: Any, rows: list[tuple[str, str]], label_max: int = 30) -> None:
    """Labels and their help in two columns, as click's `write_dl`, except that a line never
    breaks at a hyphen: `--batch-size` stays whole, so it can be read and copied."""
    column = min(max(len(label) for label, _ in rows), label_max) + 2
    indent = " " * formatter.current_indent
    width = max(formatter.width - formatter.current_indent - column, 20)
    for label, text in rows:
        lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)
        if len(label) + 2 > column:  # a long label gets a line of its own
            formatter.write(f"{indent}{label}\n")
        else:
            first = lines.pop(0) if lines else ""
            formatter.write(f"{indent}{label:<{column}}{first}".rstrip() + "\n")
        for line in lines:
            formatter.write(f"{indent}{'':<{column}}{line}\n")


def _argument_label(param: Any) -> str:
    return metavar_of(param) + ("..." if param.nargs != 1 else "")


class ReadableCommand(TyperCommand):
    """A command whose usage line and parameter list use metavars (DIR, KEY=VALUE), not Python types."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                label = _argument_label(param)
                pieces.append(label if param.required else f"[{label}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:  # hidden
                continue
            label, text = record
            if param.param_type_name == "argument":
                arguments.append((_argument_label(param), text))
                continue
            shown = _SHOWN_TYPE.search(label)
            if shown and not param.metavar:
                label = label[:shown.start()] + " " + metavar_of(param, shown[1])
            options.append((label, text))
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    write_rows(formatter, rows)

    def get_short_help_str(self, limit: int = 45) -> str:
        # The command list wraps each line, so the first sentence is shown whole, never cut.
        text = inspect.cleandoc(self.short_help or self.help or "").split("\n\n")[0]
        return " ".join(text.split())


def use_readable_help(app: typer.Typer) -> None:
    """Build every command of `app` and of its sub-apps as a `ReadableCommand`."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):  # typer's default, not a class of the command's own
            info.cls = ReadableCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_readable_help(group.typer_instance)
