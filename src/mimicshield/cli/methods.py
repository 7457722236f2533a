"""``mimicshield methods``: one line per protection method."""

from __future__ import annotations

import typer


def methods() -> None:
    """List the protection methods, one line each."""
    from ..defaults import DEFAULT_METHOD
    from ..methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, method in METHODS.items():
        marker = " (default)" if name == DEFAULT_METHOD else ""
        start = "random start" if method.random_start else "no random start"
        typer.echo(f"{name:<{width}}  {method.summary}; {start}{marker}")
