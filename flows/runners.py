"""Where the pipeline's tasks run: a thread pool (default), or Dask (an existing cluster, or local processes)."""
from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from mergeflow import settings


def make_task_runner(*, workers: int | None = None, dask_address: str | None = None, dask_workers: int = 0) -> TaskRunner[Any]:
    """The task runner for the given choice; with none, the environment's (MERGEFLOW_WORKERS, MERGEFLOW_DASK_*).

    Args:
        workers: threads of the default ThreadPoolTaskRunner (shards merged at once).
        dask_address: scheduler of an existing Dask cluster, e.g. ``tcp://10.0.0.5:8786``. Its workers need
            ``PREFECT_API_URL`` pointing at the same Prefect server and the staging folder's filesystem.
        dask_workers: start a local Dask cluster of this many single-threaded worker processes.

    Example:
        >>> merge_pipeline.with_options(task_runner=make_task_runner(dask_workers=4))(recipe=..., out=...)
    """
    if dask_address or dask_workers > 0:
        from prefect_dask.task_runners import DaskTaskRunner  # dask and distributed take ~0.6 s to import: only when used

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    if dask_workers > 0:
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "processes": True, "threads_per_worker": 1})
    return ThreadPoolTaskRunner(max_workers=workers or settings.WORKERS)


def default_task_runner() -> TaskRunner[Any]:
    return make_task_runner(workers=settings.WORKERS, dask_address=settings.DASK_ADDRESS, dask_workers=settings.DASK_WORKERS)


def share_api_with_worker_processes() -> str:
    """Make sure worker processes started from now on reach this process's Prefect API; returns its URL.

    With ``PREFECT_API_URL`` set, nothing to do. Without it, Prefect would start a temporary server in this
    process and every Dask worker process another (~30 s each): start it now and export its URL, so the
    workers use it too. Prefect stops it when this process exits.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    server = SubprocessASGIServer()  # the instance this process's own Prefect client uses in ephemeral mode
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the worker processes
    return server.api_url
