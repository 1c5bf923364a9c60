"""The run's summary tasks: a Prefect artifact for people, and the ``RunSummary`` the callers get (of a merged model, or of
an adapter-space merge, which writes its one file in the same task)."""
from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from merge_ops.compatibility import CompatibilityReport
from merge_ops.recipe import Recipe
from mergeflow.adapter_output import merge_adapter_output
from mergeflow.run_summary import RunSummary, summarize
from mergeflow.sources import Source
from mergeflow.staging import ShardResult, Staging
from tasks.retries import LOCAL


def _flow_started() -> float:
    run_id = flow_run.get_id()
    if run_id is None:
        return time.time()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
    return run.start_time.timestamp() if run.start_time else time.time()


@task(name="summarize_run", **LOCAL)
def summarize_run(recipe: Recipe, sources: list[Source], report: CompatibilityReport, staging: Staging, results: list[ShardResult], out: Path) -> RunSummary:
    """Publish the run summary artifact and return it."""
    summary = summarize(recipe, sources, report, staging, results, out, started_at=_flow_started())
    create_markdown_artifact(summary.markdown(report), key="merge-summary", description=f"merge into {out}")
    get_run_logger().info("merged %s: %.2f GB in %.1f s", out, summary.total_size / 1e9, summary.pipeline_seconds)
    return summary


@task(name="merge_adapter", **LOCAL)
def merge_adapter(
    recipe: Recipe, sources: list[Source], report: CompatibilityReport, out: Path, device: str = "cpu", force: bool = False, allow_nonfinite: bool = False,
) -> RunSummary:
    """Combine the downloaded adapters into one adapter folder at ``out`` (``output: adapter``); the run summary artifact."""
    summary = merge_adapter_output(recipe, sources, report, out, device=device, force=force, started_at=_flow_started(), allow_nonfinite=allow_nonfinite)
    create_markdown_artifact(summary.markdown(report), key="merge-summary", description=f"adapter merge into {out}")
    get_run_logger().info("merged %d adapters into %s (%s): %.1f MB in %.1f s", len(summary.sources) - 1, out, recipe.merge_method,
                          summary.total_size / 1e6, summary.merge_seconds)
    return summary
