"""How network-facing tasks retry: transient failures only, with exponential backoff (plus jitter)."""
from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
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


NETWORK: dict[str, Any] = dict(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=0.5, retry_condition_fn=only_transient,
                               cache_policy=NO_CACHE, persist_result=False)
"""Options of every task that talks to the Hub or MLflow."""
LOCAL: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)
"""Options of every task that does not retry and keeps no result."""
