"""A sweep: merge a grid of recipe variants, evaluate and rank them, and send the best through the gate to publishing.

    >>> sweep.with_options(task_runner=make_task_runner(workers=2))(
    ...     recipe=Path("recipes/skills-ties.yaml"), grid={"method": ["ties", "task_arithmetic"], "density": [0.5, 0.9]},
    ...     out=Path("sweeps/skills-ties"), publish_repo="me/skills-best",
    ... )

The sources are resolved, checked and downloaded once; the candidates are merged and evaluated concurrently,
as many at once as the task runner has workers (``mergeflow sweep --workers``). Each candidate is a child
MLflow run of the sweep's run; the ranked table is a Prefect artifact and the parent run's ``ranking.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from pydantic import BaseModel

from flows.evaluate_publish import EvaluatePublishResult, evaluate_sources, evaluate_track_publish
from flows.merge_pipeline import prepare_sources
from flows.runners import default_task_runner
from mergeflow import settings
from mergeflow.evaluation import EvalSettings
from mergeflow.gate import GatePolicy
from mergeflow.hub import PublishTarget
from mergeflow.sweep import CandidateResult
from tasks.evaluation import evaluate_model_task
from tasks.recipe import load_recipe
from tasks.sweep import (
    merge_candidate_task,
    rank_candidates_task,
    record_sweep_outcome_task,
    track_sweep_task,
    write_candidates_task,
)


class SweepResult(BaseModel):
    recipe: Path
    out: Path
    grid: dict[str, list[Any]]
    candidates: list[CandidateResult]
    """Best first."""
    references: dict[str, dict[str, float]]
    """Each source's task scores (the base included)."""
    parent_run_id: str
    tracking_uri: str
    publish: EvaluatePublishResult | None = None
    """The best candidate through evaluate -> track -> gate -> publish; None without a publish repo."""

    @property
    def best(self) -> CandidateResult:
        return self.candidates[0]


@flow(name="sweep", flow_run_name="sweep-{recipe.stem}", task_runner=default_task_runner())
def sweep(
    recipe: Path,
    grid: dict[str, list[Any]],
    out: Path,
    publish_repo: str | None = None,
    private: bool = False,
    params_file: Path | None = None,
    evaluation: EvalSettings | None = None,
    gate: GatePolicy | None = None,
    force: bool = False,
    device: str = "cpu",
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    eval_cache_dir: Path | None = None,
    tracking_uri: str | None = None,
) -> SweepResult:
    """Merge, evaluate and rank every candidate of ``grid`` over ``recipe``; publish the best if it passes the gate.

    Args:
        recipe: the base recipe; relative local model paths are tried against the working directory, then its folder.
        grid: key -> values (``merge_ops.sweep_grid.parse_grid``): ``method`` and recipe parameters.
        out: the sweep's folder: ``recipes/NAME.yaml`` and the merged model ``NAME/`` of each candidate.
        publish_repo: Hub repo the best candidate is published to if it passes the gate; None ranks only.
        params_file: params.yaml with the ``eval:`` and ``gate:`` sections (default ``settings.PARAMS_FILE``).
        evaluation, gate: override those sections.
        force: merge into ``out`` even if it exists, replacing candidates of the same name.
        The others: as for ``merge_pipeline`` and ``evaluate_track_publish``.

    Raises:
        RecipeError: a bad grid or candidate, before anything is downloaded.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    params = Path(params_file or settings.PARAMS_FILE)
    evaluation = evaluation or EvalSettings.from_params(params)

    # Load the recipe; write one recipe per candidate
    parsed = load_recipe(recipe)
    candidates = write_candidates_task(parsed, grid, out, force)

    # Resolve, check and download the sources once for every candidate
    sources, headers, report = prepare_sources(parsed, endpoint, cache_dir)

    # Merge the candidates concurrently (as many at once as the task runner has workers); meanwhile evaluate the
    # sources, then each candidate as soon as it is merged: one at a time, lm-eval's accelerate state is per process
    merges = merge_candidate_task.map(candidates, unmapped(headers), unmapped(sources), unmapped(report), unmapped(device), unmapped(force))
    references = evaluate_sources(sources, evaluation, eval_cache_dir)
    shards, evaluations = [], []
    for candidate, merged in zip(candidates, merges, strict=False):
        shards.append(merged.result())
        evaluations.append(evaluate_model_task(candidate.out, evaluation, candidate.name, eval_cache_dir))

    # Rank; one MLflow parent run with a child run per candidate; the ranked table as an artifact
    ranked = rank_candidates_task(candidates, shards, evaluations)
    tracking = track_sweep_task(parsed, grid, ranked, references, evaluation, tracking_uri)

    # The best candidate through evaluate -> track -> gate -> publish (its evaluations come from the cache)
    published = None
    if publish_repo:
        best = tracking.candidates[0]
        published = evaluate_track_publish(
            merged_dir=best.folder, recipe=load_recipe(best.recipe), sources=sources, evaluation=evaluation, gate=gate,
            publish=PublishTarget(repo_id=publish_repo, private=private, endpoint=endpoint), compatibility=report,
            params_file=params, eval_cache_dir=eval_cache_dir, tracking_uri=tracking.tracking_uri, fail_on_gate=False, endpoint=endpoint,
        )
        record_sweep_outcome_task(tracking, published.outcome, published.run.run_id, published.published)
    return SweepResult(
        recipe=recipe, out=out, grid=grid, candidates=tracking.candidates, parent_run_id=tracking.parent_run_id,
        references={k: r.task_scores for k, r in references.items()}, tracking_uri=tracking.tracking_uri, publish=published,
    )
