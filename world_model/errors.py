"""Errors shared by every layer (the CLI turns :class:`UsageError` into exit code 2)."""


class UsageError(ValueError):
    """Bad user input. The message names the bad value and what was expected."""
