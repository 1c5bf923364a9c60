"""Prefect's run logs show a mergeflow error once, as its one line, without Prefect's tracebacks.

A task that fails with a mergeflow error already says so in its "Finished in state Failed(...)" line; the flow
run then logs the same exception again with the whole chained traceback ("Encountered exception during
execution"). The filter drops that repeat, and turns any other record carrying a mergeflow error into its
message alone. Unexpected errors (bugs) keep their tracebacks, and ``MERGEFLOW_DEBUG=1`` keeps them all.
"""
from __future__ import annotations

import logging
from types import TracebackType

from merge_ops.errors import MergeflowError
from mergeflow import settings

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""The loggers Prefect's engines write flow and task run logs to."""
TASK_ENGINE = "prefect/task_engine.py"


class OneLineErrors(logging.Filter):
    """Drop a flow's repeat of a task's mergeflow error; strip the traceback from every other mergeflow error record."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if settings.DEBUG or not isinstance(error, MergeflowError):
            return True
        if record.name == "prefect.flow_runs" and _raised_in_task(error.__traceback__):
            return False
        record.msg, record.args = f"error: {error}", ()
        record.exc_info, record.exc_text = None, None
        return True


def _raised_in_task(tb: TracebackType | None) -> bool:
    """Whether the traceback passes through Prefect's task engine (the error came out of a task run)."""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(TASK_ENGINE):
            return True
        tb = tb.tb_next
    return False


def install() -> None:
    """Add the filter to Prefect's run loggers (once; safe to call again)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineErrors) for f in logger.filters):
            logger.addFilter(OneLineErrors())
