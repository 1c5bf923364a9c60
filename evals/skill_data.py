"""Loader for the demo skills' test sets, used by the task YAMLs as ``custom_dataset``.

lm-eval resolves ``dataset_kwargs.data_files`` against the process's working directory; this loader
resolves ``data_file`` against this folder instead, so ``--include_path evals`` works from any cwd.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_file: str, **_metadata) -> datasets.DatasetDict:
    """The JSONL file ``data_file`` (relative to this folder) as a DatasetDict with one "test" split."""
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: regenerate it with `python -m mergeflow.demo_family.test_sets {HERE / 'data'}`"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
