"""Tasks of the merge: plan into a staging folder, merge each shard (cached by plan hash and index), finalize.

How the staging folder makes a killed run resumable is in ``mergeflow.staging``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from merge_ops.compatibility import CompatibilityReport
from merge_ops.headers import ModelHeaders
from merge_ops.recipe import Recipe
from mergeflow import settings
from mergeflow.sources import Source, local_headers
from mergeflow.staging import ShardResult, Staging, merge_shard_file, plan_into_staging, publish_staging, shard_cache_key
from tasks.retries import LOCAL


@task(name="plan_merge", **LOCAL)
def plan_shards(
    recipe: Recipe, headers: list[ModelHeaders], sources: list[Source], report: CompatibilityReport, out: Path, shard_size: int,
    compute_dtype: str, force: bool = False, inputs: list[Path] | None = None,
) -> Staging:
    """Plan the merge from the checked headers (weights downloaded) and prepare the staging folder; says which shards a resumed run can skip."""
    staging = plan_into_staging(recipe, local_headers(headers, sources), out, shard_size=shard_size, compute_dtype=compute_dtype,
                                checked=report, force=force, inputs=inputs or [])
    get_run_logger().info(
        "plan %s: %d shard(s), %d tensors, %.2f GB to write, staging in %s%s", staging.plan_sha256[:12], len(staging.shard_files),
        staging.tensor_count, staging.total_size / 1e9, staging.dir, f"; resuming, {len(staging.done_before)} shard(s) already done" if staging.done_before else "",
    )
    for folder in staging.removed_staging:
        get_run_logger().warning("removed %s, left by a killed run of another plan", folder)
    return staging


def _shard_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    staging: Staging = parameters["staging"]
    return shard_cache_key(staging.plan_sha256, parameters["index"])


@task(name="merge_shard", task_run_name="merge-shard-{index}", cache_key_fn=_shard_key, persist_result=True)
def merge_shard(staging: Staging, index: int, device: str = "cpu", allow_nonfinite: bool = False) -> ShardResult:
    """Merge one output shard into the staging folder (cached by plan hash and index, so reruns skip it)."""
    torch.set_num_threads(settings.TORCH_THREADS)
    result = merge_shard_file(staging.plan_path, index, staging.dir, device=device, allow_nonfinite=allow_nonfinite)
    get_run_logger().info("%s: %.1f MB in %.1f s (%.0f MB/s)", result.file, result.nbytes / 1e6, result.seconds, result.nbytes / 1e6 / max(result.seconds, 1e-9))
    return result


@task(name="finalize_model", **LOCAL)
def finalize_model(staging: Staging, results: list[ShardResult], force: bool = False) -> Path:
    """Write index, config, tokenizer and card, then move the complete model to its output path."""
    out = publish_staging(staging, results, force=force)
    get_run_logger().info("model written to %s", out)
    return out
