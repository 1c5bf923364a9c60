"""The CLI's error console, and the decorator that turns mergeflow errors into one red line."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from merge_ops.errors import MergeflowError
from mergeflow import settings

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


def friendly_errors(fn: F) -> F:
    """Turn mergeflow errors into one red message and exit code 1 (tracebacks with MERGEFLOW_DEBUG=1)."""

    def run(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except MergeflowError as err:
            if settings.DEBUG:
                raise
            console.print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None

    run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
