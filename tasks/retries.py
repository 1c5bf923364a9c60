"""How network-facing tasks retry: transient failures only, a bounded number of times with exponential backoff (plus
jitter); ``settings.RETRIES`` and ``settings.RETRY_DELAY`` (MERGEFLOW_RETRIES, MERGEFLOW_RETRY_DELAY) set both."""
from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from merge_ops.errors import MergeflowError
from mergeflow import settings
from mergeflow.errors import HubError


def retry_delays(retries: int, first: float) -> list[float]:
    """Seconds before each retry: ``first``, then 4 times longer each time, at most 30 s (default 2, 8, 30)."""
    return [min(first * 4**i, 30.0) for i in range(retries)]


RETRY_DELAYS = retry_delays(settings.RETRIES, settings.RETRY_DELAY)
"""Seconds before the 1st, 2nd, ... retry."""


def only_transient(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a transient Hub failure (no answer, no connection, 5xx, 429) or an error from another client (MLflow,
    network); never a mergeflow error that won't heal (not found, unauthorised, incompatible, a bad answer)."""
    try:
        state.result()
    except HubError as err:
        return err.transient
    except MergeflowError:
        return False
    except Exception:
        return True
    return True


NETWORK: dict[str, Any] = dict(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS or 0, retry_jitter_factor=0.5, retry_condition_fn=only_transient,
                               cache_policy=NO_CACHE, persist_result=False)
"""Options of every task that talks to the Hub or MLflow."""
LOCAL: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)
"""Options of every task that does not retry and keeps no result."""
