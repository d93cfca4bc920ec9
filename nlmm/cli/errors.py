"""The one sentence a user reads when a command fails: what is wrong and what to do next.

Mistakes on the command line (a missing argument, a value out of range, an unknown option)
name the argument or option, the value given and the allowed ones, and point at the command's
`--help`; nlmm's own errors (`NlmmError`) are shown as written; anything else names its type
and points at `--debug`. Class names of the parser's exceptions never reach the user.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

# Typer (pinned to one minor series in pyproject.toml) ships its own copy of click; these are
# the exceptions its parser raises.
from typer._click import exceptions as parser

from nlmm.cli.help import metavar_of
from nlmm.errors import NlmmError

USAGE_EXIT = 2  # click's status for command-line mistakes, kept for scripts that test it
ERROR_EXIT = 1

_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}
_KINDS = {"int_parsing": "a whole number", "int_from_float": "a whole number",
          "int_type": "a whole number", "float_parsing": "a number", "float_type": "a number",
          "bool_parsing": "true or false", "bool_type": "true or false"}


def help_instead(exc: BaseException) -> str | None:
    """The help text to show for a command (or group) typed without any argument."""
    if isinstance(exc, parser.NoArgsIsHelpError) and exc.ctx is not None:
        return exc.ctx.get_help()
    return None


def describe(exc: BaseException, command: str = "nlmm") -> tuple[str, int]:
    """The sentence to print for an exception that ended a command, and the exit status.

    `command` is the command line's command path (`nlmm train`), used when the exception does
    not carry its own."""
    if isinstance(exc, NlmmError):
        return str(exc), ERROR_EXIT
    if isinstance(exc, parser.UsageError):
        ctx = getattr(exc, "ctx", None)
        return _usage(exc, ctx.command_path if ctx is not None else command), USAGE_EXIT
    text = str(exc).strip() or "no details"
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)", ERROR_EXIT


def _usage(exc: parser.UsageError, cmd: str) -> str:
    see = f"see `{cmd} --help`"
    if isinstance(exc, parser.MissingParameter):
        return _missing(exc.param, cmd, see)
    if isinstance(exc, parser.BadParameter) and exc.param is not None:
        return f"{param_name(exc.param)} {_bad_value(exc)}; {see}."
    if isinstance(exc, parser.NoSuchOption):
        near = difflib.get_close_matches(exc.option_name, exc.possibilities or [], n=1)
        guess = f" (did you mean {near[0]}?)" if near else ""
        return f"{cmd} has no option {exc.option_name}{guess}; {see}."
    if isinstance(exc, parser.BadOptionUsage) and "requires an argument" in exc.message:
        return f"{exc.option_name} needs a value; {see}."
    unknown = re.fullmatch(r"No such command '(.+?)'\.(?: Did you mean '(.+?)'\?)?",
                           exc.message.strip())
    if unknown:
        guess = f" (did you mean {unknown[2]}?)" if unknown[2] else ""
        return f"{cmd} has no command {unknown[1]!r}{guess}; see `{cmd} --help` for the list."
    message = exc.format_message().strip().rstrip(".")
    return f"{message[:1].lower()}{message[1:]}; {see}."


def param_name(param: Any) -> str:
    """How the help shows a parameter: an argument's metavar (ROOT), an option's first name."""
    if param.param_type_name == "argument":
        return metavar_of(param)
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs or param.opts)[0]


def _missing(param: Any, cmd: str, see: str) -> str:
    if param is None:
        return f"{cmd} is missing a parameter; {see}."
    about = (param.help or "").strip().rstrip(".")
    about = f" ({about[:1].lower()}{about[1:]})" if about else ""
    return f"{cmd} needs {param_name(param)}{about}; {see}."


def _bad_value(exc: parser.BadParameter) -> str:
    """`must be at least 0, got '-1'` from the validation error behind the parser's message."""
    errors = getattr(exc.__cause__, "errors", None)  # pydantic's ValidationError.errors
    details = errors() if callable(errors) else []
    detail = details[0] if details else {}
    got = f", got {detail['input']!r}" if "input" in detail else ""
    kind, ctx = detail.get("type", ""), detail.get("ctx") or {}
    message = str(detail.get("msg") or exc.message).strip()
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        return f"must be {_BOUNDS[kind][1]} {ctx[_BOUNDS[kind][0]]}{got}"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}{got}"
    choices = re.search(r"is not one of (.+?)\.?$", message)
    if choices:
        allowed = ", ".join(re.findall(r"'([^']*)'", choices[1]))
        return f"must be one of {allowed}{got}"
    message = re.sub(r"^Value error, ", "", message).rstrip(".")
    return f"is not valid: {message[:1].lower()}{message[1:]}{got}"
