"""When network-facing tasks retry: transient failures only, with exponential backoff (plus jitter)."""
from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import State, TaskRun

from merge_ops.errors import MergeflowError

RETRY_DELAYS = [2, 8, 30]
"""Seconds before the 1st, 2nd and 3rd retry."""


def only_transient(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry unless the failure is a mergeflow error (not found, unauthorised, incompatible): those won't heal."""
    try:
        state.result()
    except MergeflowError:
        return False
    except Exception:
        return True
    return True
