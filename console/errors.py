"""Which errors the dash's workers catch and show (`NlmmDash.notify_error`) instead of crashing.

These carry one sentence that tells the user what to do next. Any other exception is a bug: it
ends the app with its traceback, as Textual does by default.
"""

from __future__ import annotations

from nlmm.errors import NlmmError

ACTION_ERRORS = (NlmmError, OSError)
