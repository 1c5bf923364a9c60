"""Every environment variable mergeflow reads, and the defaults they override."""
from __future__ import annotations

import os
from pathlib import Path

DEBUG: bool = os.environ.get("MERGEFLOW_DEBUG", "").lower() in ("1", "true", "yes")
"""MERGEFLOW_DEBUG=1: show full tracebacks instead of one-line errors."""

# -- the Prefect pipeline (tasks/, flows/) -------------------------------------------------------

HF_ENDPOINT: str = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
"""HF_ENDPOINT: the Hub (or a Hub-compatible server) models are downloaded from and published to."""

HF_CACHE_DIR: Path | None = Path(os.environ["MERGEFLOW_HF_CACHE"]) if os.environ.get("MERGEFLOW_HF_CACHE") else None
"""MERGEFLOW_HF_CACHE: where downloads are cached; unset uses huggingface_hub's cache (HF_HUB_CACHE / HF_HOME)."""

HUB_TIMEOUT: float = float(os.environ.get("MERGEFLOW_HUB_TIMEOUT") or 30)
"""MERGEFLOW_HUB_TIMEOUT: seconds any one Hub request may take to connect, to send, or between two pieces of its
answer; a Hub that stays silent longer fails with a one-line error (retried like any transient failure)."""

RETRIES: int = int(os.environ.get("MERGEFLOW_RETRIES") or 3)
"""MERGEFLOW_RETRIES: how often a network task (Hub, MLflow) is retried after a transient failure (0: never)."""

RETRY_DELAY: float = float(os.environ.get("MERGEFLOW_RETRY_DELAY") or 2)
"""MERGEFLOW_RETRY_DELAY: seconds before the first retry; each next waits 4 times longer, at most 30 s (2, 8, 30)."""

WORKERS: int = int(os.environ.get("MERGEFLOW_WORKERS", "2"))
"""MERGEFLOW_WORKERS: shards merged at once by the default thread-pool task runner."""

DASK_ADDRESS: str | None = os.environ.get("MERGEFLOW_DASK_ADDRESS") or None
"""MERGEFLOW_DASK_ADDRESS: run tasks on this existing Dask cluster (``tcp://host:8786``) instead of threads."""

DASK_WORKERS: int = int(os.environ.get("MERGEFLOW_DASK_WORKERS", "0"))
"""MERGEFLOW_DASK_WORKERS: when > 0 (and no address), run tasks on a local Dask cluster of this many processes."""

TORCH_THREADS: int = int(os.environ.get("MERGEFLOW_TORCH_THREADS", "1"))
"""MERGEFLOW_TORCH_THREADS: torch threads per shard task (shards already run in parallel)."""


def download_cache(cache_dir: Path | None = None) -> Path:
    """Where downloads are cached: ``cache_dir``, else MERGEFLOW_HF_CACHE, else huggingface_hub's cache (HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return Path(cache_dir or HF_CACHE_DIR or constants.HF_HUB_CACHE)


def hf_token() -> str | None:
    """The Hub token: HF_TOKEN, else the one saved by ``hf auth login`` (huggingface_hub reads both).

    Read at call time inside tasks, so it never becomes a task argument, a log line or a Prefect record.
    """
    from huggingface_hub import get_token

    return get_token()


# -- evaluation, tracking and publishing (mergeflow/evaluation.py, mergeflow/tracking.py, flows/evaluate_publish.py)

PARAMS_FILE: Path = Path(os.environ.get("MERGEFLOW_PARAMS", "params.yaml"))
"""MERGEFLOW_PARAMS: the params file whose ``eval:`` and ``gate:`` sections are the defaults of evaluate_track_publish."""

EVAL_CACHE_DIR: Path = Path(os.environ.get("MERGEFLOW_EVAL_CACHE", ".mergeflow/eval-cache"))
"""MERGEFLOW_EVAL_CACHE: lm-eval results by model content hash + settings, so sources and the base evaluate once."""

MLFLOW_TRACKING_URI: str | None = os.environ.get("MLFLOW_TRACKING_URI") or None
"""MLFLOW_TRACKING_URI: an MLflow tracking server or database (teams); unset keeps a local store in MLRUNS_DIR."""

MLRUNS_DIR: Path = Path(os.environ.get("MERGEFLOW_MLRUNS", "mlruns"))
"""MERGEFLOW_MLRUNS: the local MLflow store (SQLite database ``mlflow.db`` and artifacts), one folder."""

MLFLOW_EXPERIMENT: str = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mergeflow")
"""MLFLOW_EXPERIMENT_NAME: the MLflow experiment merged models are tracked in."""

DVC_STAGE: str | None = os.environ.get("DVC_STAGE") or None
"""DVC_STAGE: set by ``dvc repro``/``dvc exp run`` for the stage being run; the run then records the output's DVC hash."""
