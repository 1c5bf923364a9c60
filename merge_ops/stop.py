"""Stopping a merge between pieces: Ctrl-C reaches only the main thread, while shards are merged on others.

The CLI's interrupt handler sets ``STOP``; every shard loop checks it before each piece and gives up its partial
file, so an interrupted run ends within one piece instead of finishing every running shard first.
"""
from __future__ import annotations

import threading

STOP = threading.Event()
"""Set when the process was asked to stop (Ctrl-C); cleared when a command starts."""


class MergeStopped(KeyboardInterrupt):
    """The shard loop saw ``STOP`` and gave up its partial file."""


def check_stop() -> None:
    """Raise MergeStopped when a stop was requested.

    Raises:
        MergeStopped: ``STOP`` is set.
    """
    if STOP.is_set():
        raise MergeStopped("stopped before the shard was complete")
