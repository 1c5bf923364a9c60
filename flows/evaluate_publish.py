"""After a merge: evaluate -> card -> track in MLflow -> gate -> publish to the Hub (only when the gate passes).
A merged adapter (``output: adapter``) and adapter sources are evaluated on their base.

A subflow of the merge pipeline, or a flow on its own for a folder merged elsewhere:

    >>> evaluate_track_publish(
    ...     merged_dir=summary.out, recipe=summary.recipe, sources=summary.sources,
    ...     stats=MergeStats.from_summary(summary), compatibility=report,
    ...     publish=PublishTarget(repo_id="me/skills-ties"),
    ... )

Evaluation settings and the gate policy default to the ``eval:`` and ``gate:`` sections of params.yaml.
A failed gate is recorded in MLflow and ends the flow with GateFailedError (nothing is published), unless
``fail_on_gate=False``, which returns the outcome instead.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from merge_ops.compatibility import CompatibilityReport
from merge_ops.lora import is_adapter_folder
from merge_ops.recipe import Recipe
from mergeflow import settings
from mergeflow.errors import GateFailedError
from mergeflow.evaluation import EvalResult, EvalSettings
from mergeflow.gate import GateDecision, GatePolicy, Outcome, outcome
from mergeflow.hub import Published, PublishTarget
from mergeflow.lineage import Lineage
from mergeflow.sources import Source
from mergeflow.tracking import MergeStats, TrackedRun, process_peak_rss
from tasks.evaluation import evaluate_model_task, report_evaluation
from tasks.gate import apply_gate_task
from tasks.publish import publish_model_task, write_card_task
from tasks.sources import download_model
from tasks.tracking import record_outcome_task, track_run_task


class EvaluatePublishResult(BaseModel):
    outcome: Outcome
    merged: EvalResult
    sources: dict[str, EvalResult]
    gate: GateDecision
    lineage: Lineage
    run: TrackedRun
    published: Published | None = None


def evaluate_sources(sources: list[Source], evaluation: EvalSettings, cache_dir: Path | None = None) -> dict[str, EvalResult]:
    """The evaluation tasks of a merge's local sources, by key, inside the calling flow; an adapter source on its base."""
    scores = {}
    for s in sources:
        adapter = s.adapter.path if s.adapter else None
        if s.path is not None:
            scores[s.key] = evaluate_model_task(adapter or s.path, evaluation, s.key, cache_dir, s.path if adapter else None)
    return scores


def evaluate_merge(
    merged_dir: Path, sources: list[Source], evaluation: EvalSettings, cache_dir: Path | None = None
) -> tuple[EvalResult, dict[str, EvalResult]]:
    """The merged folder's evaluation (a merged adapter on the base its sources share), then its sources'."""
    base = next((s.path for s in sources if s.path), None) if is_adapter_folder(merged_dir) else None
    return evaluate_model_task(merged_dir, evaluation, "merged", cache_dir, base), evaluate_sources(sources, evaluation, cache_dir)


def _run_name() -> str:
    return f"evaluate-publish-{Path(str(flow_run.parameters['merged_dir'])).name}"


@flow(name="evaluate_track_publish", flow_run_name=_run_name)
def evaluate_track_publish(
    merged_dir: Path,
    recipe: Recipe,
    sources: list[Source],
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
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> EvaluatePublishResult:
    """Evaluate the merged model and its sources, track it in MLflow, and publish it if it passes the gate.

    Args:
        merged_dir: the finished merged model folder (its README.md is rewritten as the Hub card).
        recipe: the recipe it was merged from, as loaded (method, base, params, sha256).
        sources: every model of the recipe, the base included, local: the pipeline's ``RunSummary.sources``
            (with Hub repo ids and commits), or ``Source(key=..., path=...)`` for local folders.
        evaluation: lm-eval tasks and settings; default: ``eval:`` of ``params_file``.
        gate: the publication policy; default: ``gate:`` of ``params_file``.
        publish: Hub repo to publish to when the gate passes; None publishes nothing.
        model_name: MLflow registered model; default: the publish repo's name, else the folder's name.
        stats: merge wall time, throughput, peak RSS; default: only this process's peak RSS.
        compatibility: the pipeline's compatibility report (an MLflow artifact).
        params_file: default ``settings.PARAMS_FILE`` (MERGEFLOW_PARAMS, ``params.yaml``).
        eval_cache_dir: default ``settings.EVAL_CACHE_DIR``; tracking_uri: default MLFLOW_TRACKING_URI, else ./mlruns.
        fail_on_gate: raise GateFailedError when the gate fails (after recording it); False returns the outcome.
        endpoint, cache_dir: the Hub and download cache for sources the merge did not download (the base of an
            ``output: adapter`` merge, which evaluation needs); defaults as for ``merge_pipeline``.

    Raises:
        GateFailedError: the gate failed (``fail_on_gate``); the MLflow run says why, nothing was published.
    """
    merged_dir = Path(merged_dir).resolve()
    params = Path(params_file or settings.PARAMS_FILE)
    evaluation = evaluation or EvalSettings.from_params(params)
    gate = gate or GatePolicy.from_params(params)
    model_name = model_name or (publish.repo_id.split("/")[-1] if publish else merged_dir.name)
    stats = stats or MergeStats(peak_rss_bytes=process_peak_rss())

    # Fetch what evaluation needs and the merge did not: the base of an adapter merge
    sources = [download_model(s, endpoint, cache_dir) if s.path is None and s.repo_id else s for s in sources]

    # Evaluate the merged model, then every source and the base (cached by content: each evaluates once)
    merged, scores = evaluate_merge(merged_dir, sources, evaluation, eval_cache_dir)
    report_evaluation(merged, scores, {s.key: s.label for s in sources})

    # The Hub card (evaluation, recipe, lineage) into the folder; the lineage of the final folder
    lineage = write_card_task(merged_dir, recipe, sources, merged, scores, model_name)

    # Track: one MLflow run with params, metrics, lineage tags, artifacts, a chart; a registered version
    run = track_run_task(merged_dir, recipe, lineage, merged, scores, evaluation, gate, model_name, stats, compatibility, tracking_uri)

    # Gate, then publish only when it passed; the outcome goes into MLflow either way
    decision = apply_gate_task(gate, merged, scores)
    published = None
    if decision.passed and publish is not None:
        try:
            published = publish_model_task(merged_dir, publish)
        except Exception:
            record_outcome_task(run, decision, "publish_failed")
            raise
    result = outcome(decision, published=published is not None)
    record_outcome_task(run, decision, result, published)
    if result == "gate_failed" and fail_on_gate:
        raise GateFailedError(merged_dir.name, decision.reasons, run_id=run.run_id)
    return EvaluatePublishResult(outcome=result, merged=merged, sources=scores, gate=decision, lineage=lineage, run=run, published=published)
