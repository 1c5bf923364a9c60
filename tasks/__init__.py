import merge_ops  # noqa: F401  (sets the OpenMP wait policy before torch loads: see merge_ops/__init__.py)
from mergeflow import run_logs

run_logs.install()  # every process that runs tasks (the CLI, `serve`, Dask workers) logs mergeflow errors as one line
