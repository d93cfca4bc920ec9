"""The one exception type whose message is shown to users as is (no traceback without --debug)."""


class NlmmError(Exception):
    """A user-facing error: one sentence saying what is wrong and what to do next."""
