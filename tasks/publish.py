"""The publishing tasks: the Hub card and lineage into the merged folder, then the upload (retried when transient)."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from merge_ops.recipe import Recipe
from mergeflow.card import write_hub_card
from mergeflow.evaluation import EvalResult
from mergeflow.hub import Published, PublishTarget, publish_model
from mergeflow.lineage import Lineage, collect_lineage, finish_lineage
from mergeflow.sources import Source
from tasks.retries import LOCAL, NETWORK


@task(name="write_model_card", **LOCAL)
def write_card_task(
    merged_dir: Path, recipe: Recipe, sources: list[Source], merged: EvalResult, source_evals: dict[str, EvalResult], model_name: str
) -> Lineage:
    """Write the Hub card into the merged folder; returns the lineage of the final folder (its size and DVC hash cover the card)."""
    run_id = flow_run.get_id()
    root_id = flow_run.get_root_flow_run_id() or run_id
    lineage = collect_lineage(recipe=recipe, sources=sources, output_hash=merged.content_hash,
                              flow_run_id=str(run_id) if run_id else None, root_flow_run_id=str(root_id) if root_id else None)
    write_hub_card(merged_dir, lineage=lineage, merged=merged, sources=source_evals, model_name=model_name)
    return finish_lineage(lineage, merged_dir)


@task(name="publish_model", task_run_name="publish-{target.repo_id}", **NETWORK)
def publish_model_task(folder: Path, target: PublishTarget) -> Published:
    """Publish the merged folder (card included) to the Hub; returns the commit sha."""
    published = publish_model(folder, repo_id=target.repo_id, private=target.private, endpoint=target.endpoint, commit_message=target.commit_message)
    state = "new commit" if published.new_commit else "unchanged, no new commit"
    get_run_logger().info("published %s to %s at %s (%s)", folder, published.repo_id, published.commit_sha, state)
    return published
