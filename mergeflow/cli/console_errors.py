"""The CLI's error console, and the decorator that turns mergeflow errors and Ctrl-C into one line."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

import typer
from rich.console import Console

from merge_ops.errors import MergeflowError
from merge_ops.stop import STOP
from mergeflow import settings

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])
INTERRUPTED_EXIT = 130
"""The shell's exit status for a command stopped by SIGINT (128 + 2)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command kept or removed (the message printed after "interrupted: ")."""


@contextmanager
def stop_merges_on_interrupt() -> Iterator[None]:
    """For the block: Ctrl-C also asks the shard loops on other threads to stop (``merge_ops.stop``), then interrupts as usual."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        STOP.set()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def friendly_errors(fn: F) -> F:
    """Mergeflow errors: one red line and exit 1; Ctrl-C: "interrupted" and exit 130 (tracebacks with MERGEFLOW_DEBUG=1)."""

    def run(*args: object, **kwargs: object) -> object:
        try:
            with stop_merges_on_interrupt():
                return fn(*args, **kwargs)
        except MergeflowError as err:
            if settings.DEBUG:
                raise
            console.print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as stop:
            if settings.DEBUG:
                raise
            detail = f": {stop}" if isinstance(stop, Interrupted) and str(stop) else ""
            console.print(f"[red]interrupted[/red]{detail}", highlight=False)
            raise typer.Exit(INTERRUPTED_EXIT) from None

    run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
