"""The whole pipeline: merge (download -> check -> shards -> finalize), then evaluate -> track -> gate -> publish.

    >>> merge_evaluate_publish(recipe=Path("recipes/skills-task-arithmetic.yaml"), out=Path("merged/skills"),
    ...                        publish_repo="me/skills-merged")
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from flows.evaluate_publish import EvaluatePublishResult, evaluate_track_publish
from flows.merge_pipeline import merge_pipeline
from merge_ops.plan import DEFAULT_SHARD_SIZE
from mergeflow.hub import PublishTarget
from mergeflow.run_summary import RunSummary
from mergeflow.tracking import MergeStats


class PipelineResult(BaseModel):
    merge: RunSummary
    evaluation: EvaluatePublishResult


@flow(name="merge_evaluate_publish", flow_run_name="merge-evaluate-publish-{out.name}")
def merge_evaluate_publish(
    recipe: Path,
    out: Path,
    publish_repo: str | None = None,
    private: bool = False,
    params_file: Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    compute_dtype: str = "float32",
    force: bool = False,
    device: str = "cpu",
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> PipelineResult:
    """Merge the recipe into ``out``, evaluate it and its sources, track it in MLflow, publish it if the gate passes.

    Args:
        publish_repo: Hub repo id to publish to when the gate passes; None evaluates and tracks only.
        params_file: params.yaml with the ``eval:`` and ``gate:`` sections (default: the project's).
        The others: as for ``merge_pipeline``.
    """
    # Merge
    summary = merge_pipeline(
        recipe=recipe, out=out, shard_size=shard_size, compute_dtype=compute_dtype, force=force,
        device=device, endpoint=endpoint, cache_dir=cache_dir,
    )

    # Evaluate, track, gate, publish
    target = PublishTarget(repo_id=publish_repo, private=private, endpoint=endpoint) if publish_repo else None
    evaluation = evaluate_track_publish(
        merged_dir=summary.out, recipe=summary.recipe, sources=summary.sources, stats=MergeStats.from_summary(summary),
        compatibility=summary.compatibility, publish=target, params_file=params_file, endpoint=endpoint, cache_dir=cache_dir,
    )
    return PipelineResult(merge=summary, evaluation=evaluation)
