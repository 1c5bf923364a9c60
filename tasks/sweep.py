"""A sweep's tasks: write the candidates' recipes, merge each, rank them, track them in MLflow (retried when transient)."""
from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from merge_ops.compatibility import CompatibilityReport
from merge_ops.headers import ModelHeaders
from merge_ops.recipe import Recipe
from merge_ops.sweep_grid import Grid
from mergeflow import settings
from mergeflow.evaluation import EvalResult, EvalSettings
from mergeflow.hub import Published
from mergeflow.sources import Source, local_headers
from mergeflow.sweep import (
    CandidateResult,
    SweepCandidate,
    SweepTracking,
    merge_candidate,
    rank_candidates,
    record_sweep_outcome,
    sweep_markdown,
    track_sweep,
    write_candidates,
)
from tasks.retries import LOCAL, NETWORK


@task(name="write_candidates", **LOCAL)
def write_candidates_task(recipe: Recipe, grid: Grid, out: Path, force: bool = False) -> list[SweepCandidate]:
    """One recipe per grid point, under ``out/recipes/``."""
    candidates = write_candidates(recipe, grid, out, force=force)
    get_run_logger().info("%d candidate(s): %s", len(candidates), ", ".join(c.name for c in candidates))
    return candidates


@task(name="merge_candidate", task_run_name="merge-{candidate.name}", **LOCAL)
def merge_candidate_task(
    candidate: SweepCandidate, headers: list[ModelHeaders], sources: list[Source], report: CompatibilityReport, device: str = "cpu",
    force: bool = False,
) -> dict[str, str]:
    """Merge one candidate into its own folder with the engine (the models were checked once for every candidate)."""
    torch.set_num_threads(settings.TORCH_THREADS)
    shards = merge_candidate(candidate, local_headers(headers, sources), checked=report, device=device, force=force)
    get_run_logger().info("%s merged into %s", candidate.name, candidate.out)
    return shards


@task(name="rank_candidates", **LOCAL)
def rank_candidates_task(candidates: list[SweepCandidate], shards: list[dict[str, str]], evaluations: list[EvalResult]) -> list[CandidateResult]:
    """Best first by mean task score."""
    ranked = rank_candidates(candidates, shards, evaluations)
    get_run_logger().info("ranking: %s", "; ".join(f"{c.rank}. {c.name} {c.mean:.4f}" for c in ranked))
    return ranked


@task(name="track_sweep", **NETWORK)
def track_sweep_task(
    recipe: Recipe, grid: Grid, candidates: list[CandidateResult], references: dict[str, EvalResult], evaluation: EvalSettings,
    tracking_uri: str | None = None,
) -> SweepTracking:
    """MLflow parent and child runs; the ranked table becomes an artifact."""
    scores = {k: r.task_scores for k, r in references.items()}
    tracking = track_sweep(recipe=recipe, grid=grid, candidates=candidates, references=scores, evaluation=evaluation, tracking_uri=tracking_uri)
    create_markdown_artifact(sweep_markdown(recipe.file_name, tracking.candidates, scores, tracking.parent_run_id), key="sweep-ranking",
                             description=f"sweep of {recipe.file_name}")
    get_run_logger().info("MLflow parent run %s at %s", tracking.parent_run_id, tracking.tracking_uri)
    return tracking


@task(name="record_sweep_outcome", **NETWORK)
def record_sweep_outcome_task(tracking: SweepTracking, outcome: str, run_id: str, published: Published | None = None) -> None:
    """The best candidate's gate outcome and Hub commit onto the parent run."""
    record_sweep_outcome(tracking, outcome=outcome, run_id=run_id, published=published)
