"""The CLI error type, kept apart so `python -m mimicshield.cli.main` sees a single class."""

from __future__ import annotations


class CLIError(Exception):
    """An error whose message is complete for the user: printed as one line, no traceback."""
