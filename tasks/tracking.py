"""The MLflow tasks (retried when transient): track a merged model with a chart of its scores, record its outcome."""
from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from merge_ops.compatibility import CompatibilityReport
from merge_ops.recipe import Recipe
from mergeflow.chart import plot_scores
from mergeflow.evaluation import EvalResult, EvalSettings
from mergeflow.gate import GateDecision, GatePolicy, Outcome
from mergeflow.hub import Published
from mergeflow.lineage import Lineage
from mergeflow.tracking import MergeStats, TrackedRun, record_outcome, track_run
from tasks.retries import NETWORK


@task(name="track_run", task_run_name="track-{model_name}", **NETWORK)
def track_run_task(
    merged_dir: Path, recipe: Recipe, lineage: Lineage, merged: EvalResult, sources: dict[str, EvalResult], evaluation: EvalSettings,
    gate: GatePolicy, model_name: str, stats: MergeStats | None = None, compatibility: CompatibilityReport | None = None,
    tracking_uri: str | None = None,
) -> TrackedRun:
    """One MLflow run for the merged model (params, metrics, lineage tags, artifacts, a chart) and a registered version."""
    names = {s.key: s.label for s in lineage.sources}
    with tempfile.TemporaryDirectory(prefix="mergeflow-chart-") as tmp:
        chart = plot_scores(merged.scores, {names.get(k, k): r.scores for k, r in sources.items()}, Path(tmp) / "scores.png",
                            title=f"{Path(merged_dir).name}: merged vs sources")
        run = track_run(merged_dir=merged_dir, recipe=recipe, lineage=lineage, merged=merged, sources=sources, evaluation=evaluation,
                        gate=gate, model_name=model_name, stats=stats, chart=chart, compatibility=compatibility, tracking_uri=tracking_uri)
    get_run_logger().info("MLflow run %s at %s; registered %s version %s", run.run_id, run.tracking_uri, run.model_name, run.model_version)
    return run


@task(name="record_outcome", **NETWORK)
def record_outcome_task(run: TrackedRun, decision: GateDecision, outcome: Outcome, published: Published | None = None) -> None:
    """The gate decision, the outcome and the Hub commit onto the MLflow run and its registered version; ends the run."""
    record_outcome(run, decision=decision, outcome=outcome, published=published)
