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

WORKERS: int = int(os.environ.get("MERGEFLOW_WORKERS", "2"))
"""MERGEFLOW_WORKERS: shards merged at once by the default thread-pool task runner."""

DASK_ADDRESS: str | None = os.environ.get("MERGEFLOW_DASK_ADDRESS") or None
"""MERGEFLOW_DASK_ADDRESS: run tasks on this existing Dask cluster (``tcp://host:8786``) instead of threads."""

DASK_WORKERS: int = int(os.environ.get("MERGEFLOW_DASK_WORKERS", "0"))
"""MERGEFLOW_DASK_WORKERS: when > 0 (and no address), run tasks on a local Dask cluster of this many processes."""

TORCH_THREADS: int = int(os.environ.get("MERGEFLOW_TORCH_THREADS", "1"))
"""MERGEFLOW_TORCH_THREADS: torch threads per shard task (shards already run in parallel)."""


def hf_token() -> str | None:
    """The Hub token: HF_TOKEN, else the one saved by ``hf auth login`` (huggingface_hub reads both).

    Read at call time inside tasks, so it never becomes a task argument, a log line or a Prefect record.
    """
    from huggingface_hub import get_token

    return get_token()
