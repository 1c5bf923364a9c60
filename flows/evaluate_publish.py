"""After a merge: evaluate -> card -> track in MLflow -> gate -> publish to the Hub (only when the gate passes).

A subflow of the merge pipeline, or a flow on its own for a folder merged elsewhere:

    >>> evaluate_track_publish(
    ...     merged_dir=summary.out, recipe=recipe, sources=summary.sources,
    ...     stats=MergeStats.from_summary(summary), compatibility=report,
    ...     publish=PublishTarget(repo_id="me/skills-ties"),
    ... )

Evaluation settings and the gate policy default to the ``eval:`` and ``gate:`` sections of params.yaml.
A failed gate is recorded in MLflow and ends the flow with GateFailedError (nothing is published), unless
``fail_on_gate=False``, which returns the outcome instead.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from merge_ops import settings
from merge_ops.errors import GateFailedError
from tasks.chart import plot_scores
from tasks.compatibility import CompatibilityReport
from tasks.evaluation import EvalResult, EvalSettings, evaluate_model_task
from tasks.gate import GateDecision, GatePolicy, apply_gate_task
from tasks.lineage import Lineage, SourceRecord
from tasks.publish import Published, PublishTarget, publish_model_task, write_card_task
from tasks.sources import ResolvedSource
from tasks.tracking import (
    MergeStats,
    TrackedRun,
    process_peak_rss,
    record_outcome_task,
    track_run_task,
)

Outcome = Literal["published", "gate_failed", "not_published"]


class EvaluatePublishResult(BaseModel):
    outcome: Outcome
    merged: EvalResult
    sources: dict[str, EvalResult]
    gate: GateDecision
    lineage: Lineage
    run: TrackedRun
    published: Published | None = None


def _run_name() -> str:
    return f"evaluate-publish-{Path(str(flow_run.parameters['merged_dir'])).name}"


def source_records(sources: list[ResolvedSource] | dict[str, Path]) -> list[SourceRecord]:
    """The pipeline's resolved sources (or ``{recipe key: folder}``) as lineage records."""
    if isinstance(sources, dict):
        return [SourceRecord(key=k, path=str(Path(p).resolve())) for k, p in sources.items()]
    return [SourceRecord(key=s.key, repo_id=s.repo_id, revision=s.revision, commit_sha=s.commit_sha, path=str(s.path) if s.path else None) for s in sources]


def evaluation_report(merged: EvalResult, sources: dict[str, EvalResult], names: dict[str, str]) -> str:
    columns = list(sources)
    lines = ["# Evaluation", "", "| task | merged | " + " | ".join(f"`{names.get(c, c)}`" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for task_name, value in merged.scores.items():
        cells = " | ".join(f"{sources[c].scores[task_name]:.4f}" if task_name in sources[c].scores else "-" for c in columns)
        lines.append(f"| {task_name} ({merged.primary[task_name]}) | **{value:.4f}** | {cells} |")
    cached = [names.get(k, k) for k, r in sources.items() if r.cached] + (["merged"] if merged.cached else [])
    return "\n".join(lines + ["", f"From the evaluation cache: {', '.join(cached) or 'none'}."]) + "\n"


@flow(name="evaluate_track_publish", flow_run_name=_run_name)
def evaluate_track_publish(
    merged_dir: Path,
    recipe: Path,
    sources: list[ResolvedSource] | dict[str, Path],
    evaluation: EvalSettings | None = None,
    gate: GatePolicy | None = None,
    publish: PublishTarget | None = None,
    model_name: str | None = None,
    stats: MergeStats | None = None,
    compatibility: CompatibilityReport | None = None,
    params_file: Path | None = None,
    eval_cache_dir: Path | None = None,
    tracking_uri: str | None = None,
    fail_on_gate: bool = True,
) -> EvaluatePublishResult:
    """Evaluate the merged model and its sources, track it in MLflow, and publish it if it passes the gate.

    Args:
        merged_dir: the finished merged model folder (its README.md is rewritten as the Hub card).
        recipe: the recipe file it was merged from (method, base, params, sha256).
        sources: every model of the recipe, the base included: the pipeline's ``RunSummary.sources``
            (``ResolvedSource``, with Hub repo ids and commits), or ``{recipe key: local folder}``.
        evaluation: lm-eval tasks and settings; default: ``eval:`` of ``params_file``.
        gate: the publication policy; default: ``gate:`` of ``params_file``.
        publish: Hub repo to publish to when the gate passes; None publishes nothing.
        model_name: MLflow registered model; default: the publish repo's name, else the folder's name.
        stats: merge wall time, throughput, peak RSS; default: only this process's peak RSS.
        compatibility: the pipeline's compatibility report (an MLflow artifact).
        params_file: default ``settings.PARAMS_FILE`` (MERGEFLOW_PARAMS, ``params.yaml``).
        eval_cache_dir: default ``settings.EVAL_CACHE_DIR``; tracking_uri: default MLFLOW_TRACKING_URI, else ./mlruns.
        fail_on_gate: raise GateFailedError when the gate fails (after recording it); False returns the outcome.

    Raises:
        GateFailedError: the gate failed (``fail_on_gate``); the MLflow run says why, nothing was published.
    """
    merged_dir, recipe = Path(merged_dir).resolve(), Path(recipe).resolve()
    params = Path(params_file or settings.PARAMS_FILE)
    evaluation = evaluation or EvalSettings.from_params(params)
    gate = gate or GatePolicy.from_params(params)
    model_name = model_name or (publish.repo_id.split("/")[-1] if publish else merged_dir.name)
    records = source_records(sources)
    stats = stats or MergeStats(peak_rss_bytes=process_peak_rss())

    # Evaluate the merged model, then every source and the base (cached by content: each evaluates once)
    merged = evaluate_model_task(merged_dir, evaluation, "merged", eval_cache_dir)
    scores = {r.key: evaluate_model_task(Path(r.path), evaluation, r.key, eval_cache_dir) for r in records if r.path}
    names = {r.key: r.label for r in records}
    create_markdown_artifact(evaluation_report(merged, scores, names), key="evaluation-report", description=f"lm-eval of {merged_dir.name}")

    # The Hub card (evaluation, recipe, lineage) into the folder; lineage and hashes of the final folder
    lineage = write_card_task(merged_dir, recipe, records, merged, scores, model_name)
    with tempfile.TemporaryDirectory(prefix="mergeflow-chart-") as tmp:
        chart = plot_scores(merged.scores, {names[k]: r.scores for k, r in scores.items()}, Path(tmp) / "scores.png",
                            title=f"{merged_dir.name}: merged vs sources")

        # Track: one MLflow run with params, metrics, lineage tags, artifacts; a registered version
        run = track_run_task(merged_dir, recipe, lineage, merged, scores, evaluation, gate, model_name, stats, chart, compatibility, tracking_uri)

    # Gate, then publish only when it passed; the outcome goes into MLflow either way
    decision = apply_gate_task(gate, merged, scores)
    published = None
    if decision.passed and publish is not None:
        try:
            published = publish_model_task(merged_dir, publish)
        except Exception:
            record_outcome_task(run, decision, None, "publish_failed")
            raise
    record_outcome_task(run, decision, published)
    outcome: Outcome = "published" if published else "not_published" if decision.passed else "gate_failed"
    if outcome == "gate_failed" and fail_on_gate:
        raise GateFailedError(merged_dir.name, decision.reasons, run_id=run.run_id)
    return EvaluatePublishResult(outcome=outcome, merged=merged, sources=scores, gate=decision, lineage=lineage, run=run, published=published)
