"""The metrics store: runs, metrics, checkpoints and system samples in one SQL database.

Its public names (nlmm.store.api) load on first use, so that a module of the store that needs no
database machinery (status, liveness, progress, sqlite_reader) can be imported without SQLAlchemy
and SQLModel, whose imports alone take 0.3 s: `nlmm runs ls` reads a SQLite store through the
standard library instead.
"""

import importlib
import pkgutil
from typing import Any


_SUBMODULES = frozenset(module.name for module in pkgutil.iter_modules(__path__))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        # `from nlmm.store import models` asks here first: not found lets the import system load it
        raise AttributeError(f"module {__name__!r} has not loaded {name!r} yet")
    api = importlib.import_module("nlmm.store.api")
    if name not in api.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(importlib.import_module("nlmm.store.api").__all__))
