"""A sweep's tasks: write the candidates' recipes, merge each into its folder, rank them, track them in MLflow.

Candidates are ranked by the mean of their tasks' primary scores (lm-eval groups left out, as they aggregate
tasks already counted), ties broken by name. MLflow gets one parent run for the sweep (the base recipe and
the grid as params, the ranking as tags and ``ranking.md``) and one child run per candidate (its method and
parameters as params, each task's score, the mean and the rank as metrics, its recipe as an artifact).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from merge_ops.compatibility import CompatibilityReport
from merge_ops.engine import merge_model
from merge_ops.errors import OutputExistsError
from merge_ops.headers import ModelHeaders
from merge_ops.plan import plan_merge
from merge_ops.recipe import Recipe
from merge_ops.recipe_file import load_recipe, parse_recipe_yaml
from merge_ops.sweep_grid import Grid, expand_grid, value_text
from mergeflow.errors import EvaluationError
from mergeflow.evaluation import EvalResult, EvalSettings, mean_score
from mergeflow.files import write_atomic
from mergeflow.hub import Published
from mergeflow.tracking import TAG, client, experiment_id, flatten, log_batches, metric_name, refusals, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

RECIPES_DIR = "recipes"


class SweepCandidate(BaseModel):
    """A candidate as the flow passes it around: its recipe file and the folder it is merged into."""

    name: str
    method: str
    parameters: dict[str, Any]
    recipe: Path
    out: Path


class CandidateResult(BaseModel):
    """A merged, evaluated and ranked candidate."""

    name: str
    method: str
    parameters: dict[str, Any]
    recipe: Path
    folder: Path
    shards: dict[str, str]
    """Shard file -> sha256, as the engine wrote it."""
    scores: dict[str, float]
    """Task -> its primary metric (groups left out)."""
    mean: float
    rank: int
    run_id: str | None = None
    """The candidate's MLflow child run."""


class SweepTracking(BaseModel):
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    candidates: list[CandidateResult]
    """Best first, with their child run ids."""


def write_candidates(recipe: Recipe, grid: Grid, out: Path, *, force: bool = False) -> list[SweepCandidate]:
    """Expand ``grid`` over the recipe and write each candidate's recipe to ``out/recipes/NAME.yaml``.

    Raises:
        RecipeError: a bad grid or candidate (every problem listed).
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    out = Path(out).absolute()
    candidates = expand_grid(parse_recipe_yaml(recipe.text, source=recipe.file_name), grid, source=recipe.file_name)
    if out.exists() and not force:
        raise OutputExistsError(str(out))
    (out / RECIPES_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    for c in candidates:
        path = out / RECIPES_DIR / f"{c.name}.yaml"
        write_atomic(path, c.variant.yaml())
        written.append(SweepCandidate(name=c.name, method=c.method, parameters=c.parameters, recipe=path, out=out / c.name))
    return written


def merge_candidate(
    candidate: SweepCandidate, models: dict[str, ModelHeaders], *, checked: CompatibilityReport, device: str = "cpu", force: bool = False
) -> dict[str, str]:
    """Merge the candidate's recipe over the downloaded, ``checked`` models into its folder; returns shard file -> sha256."""
    plan = plan_merge(load_recipe(candidate.recipe), models, checked=checked)
    return merge_model(plan, candidate.out, device=device, force=force, inputs=[candidate.recipe])


def rank_candidates(candidates: list[SweepCandidate], shards: list[dict[str, str]], evaluations: list[EvalResult]) -> list[CandidateResult]:
    """The candidates best first: by the mean of their task scores (groups left out), ties broken by name.

    Raises:
        EvaluationError: a candidate has no task score to rank it by.
    """
    results = []
    for c, files, evaluation in zip(candidates, shards, evaluations, strict=True):
        scores = evaluation.task_scores
        if not scores:
            raise EvaluationError(f"{c.name}: lm-eval gave no task score to rank it by; check eval.tasks in params.yaml")
        results.append(CandidateResult(name=c.name, method=c.method, parameters=c.parameters, recipe=c.recipe, folder=c.out,
                                       shards=files, scores=scores, mean=mean_score(scores), rank=0))
    ranked = sorted(results, key=lambda r: (-r.mean, r.name))
    return [r.model_copy(update={"rank": i}) for i, r in enumerate(ranked, start=1)]


def sweep_markdown(recipe: str, candidates: list[CandidateResult], references: dict[str, dict[str, float]], parent_run_id: str | None = None) -> str:
    """The ranked table (and the sources' scores for reference) in markdown."""
    tasks = list(dict.fromkeys(t for c in candidates for t in c.scores))
    where = f" MLflow parent run `{parent_run_id}`." if parent_run_id else ""
    lines = [f"# Sweep of `{recipe}`: {len(candidates)} candidate(s)", "",
             f"Ranked by the mean of each task's primary metric, ties broken by name.{where}", "",
             "| rank | candidate | " + " | ".join(tasks) + " | mean | MLflow run |", "|---|---|" + "---|" * (len(tasks) + 2)]
    for c in candidates:
        cells = " | ".join(f"{c.scores[t]:.4f}" if t in c.scores else "-" for t in tasks)
        lines.append(f"| {c.rank} | `{c.name}` | {cells} | **{c.mean:.4f}** | `{c.run_id or '-'}` |")
    for key, scores in references.items():
        cells = " | ".join(f"{scores[t]:.4f}" if t in scores else "-" for t in tasks)
        lines.append(f"| - | source `{key}` | {cells} | {mean_score(scores):.4f} | |")
    return "\n".join(lines) + "\n"


def _track_candidate(mlflow: MlflowClient, exp: str, parent: str, candidate: CandidateResult, eval_params: dict[str, str]) -> str:
    c = candidate
    run = mlflow.create_run(exp, run_name=c.name, tags={"mlflow.runName": c.name, "mlflow.parentRunId": parent}).info.run_id
    metrics = {metric_name("eval", t): v for t, v in c.scores.items()} | {"eval/mean": c.mean, "rank": float(c.rank)}
    tags = {f"{TAG}sweep": "candidate", f"{TAG}method": c.method, f"{TAG}output_dir": str(c.folder)}
    log_batches(mlflow, run, params=flatten({"merge_method": c.method, **c.parameters}) | eval_params, metrics=metrics, tags=tags)
    mlflow.log_artifact(run, str(c.recipe), "recipe")
    mlflow.set_terminated(run, "FINISHED")
    return str(run)


def track_sweep(
    *, recipe: Recipe, grid: Grid, candidates: list[CandidateResult], references: dict[str, dict[str, float]],
    evaluation: EvalSettings, tracking_uri: str | None = None,
) -> SweepTracking:
    """One MLflow parent run for the sweep and a child run per candidate, all finished.

    Args:
        recipe: the base recipe (its fields flattened into the parent's params, like ``track_run`` does).
        grid: the grid (``grid.<key>`` params of the parent).
        candidates: ranked, from ``rank_candidates``.
        references: each source's task scores (``reference/<source>/<task>`` metrics of the parent).
        evaluation: the lm-eval settings (``eval.*`` params of every run).
        tracking_uri: default ``resolve_tracking_uri()``; the experiment is MLFLOW_EXPERIMENT_NAME or "mergeflow".

    Raises:
        TrackingError: MLflow refused a request (4xx).
    """
    uri = resolve_tracking_uri(tracking_uri)
    mlflow = client(uri)
    eval_params = flatten(evaluation.model_dump(mode="json"), "eval")
    with refusals(uri):
        exp = experiment_id(mlflow, uri)
        name = f"sweep-{Path(recipe.file_name).stem}"
        parent = mlflow.create_run(exp, run_name=name, tags={"mlflow.runName": name, f"{TAG}sweep": "parent"}).info.run_id
        try:
            ranked = [c.model_copy(update={"run_id": _track_candidate(mlflow, exp, parent, c, eval_params)}) for c in candidates]
            best = ranked[0]
            grid_params = {f"grid.{k}": ",".join(value_text(v) for v in values) for k, values in grid.items()}
            metrics = {metric_name("reference", k, t): v for k, scores in references.items() for t, v in scores.items()} | {"best/mean": best.mean}
            tags = {f"{TAG}sweep.ranking": "; ".join(f"{c.rank}. {c.name} {c.mean:.4f}" for c in ranked),
                    f"{TAG}sweep.best": best.name, f"{TAG}sweep.best_run_id": str(best.run_id), f"{TAG}sweep.candidates": str(len(ranked))}
            params = flatten(recipe.model_dump(mode="json", exclude_unset=True)) | grid_params | eval_params
            log_batches(mlflow, parent, params=params, metrics=metrics, tags=tags)
            mlflow.log_text(parent, sweep_markdown(recipe.file_name, ranked, references, parent), "ranking.md")
        except BaseException:
            mlflow.set_terminated(parent, "FAILED")
            raise
        mlflow.set_terminated(parent, "FINISHED")
    return SweepTracking(parent_run_id=parent, experiment_id=exp, tracking_uri=uri, candidates=ranked)


def record_sweep_outcome(tracking: SweepTracking, *, outcome: str, run_id: str, published: Published | None = None) -> None:
    """Tag the parent run with what became of the best candidate: the gate's outcome, its MLflow run, the Hub commit."""
    tags = {f"{TAG}outcome": outcome, f"{TAG}sweep.publish_run_id": run_id}
    if published is not None:
        tags |= {f"{TAG}hub.repo_id": published.repo_id, f"{TAG}hub.commit": published.commit_sha, f"{TAG}hub.url": published.url}
    with refusals(tracking.tracking_uri):
        log_batches(client(tracking.tracking_uri), tracking.parent_run_id, params={}, metrics={}, tags=tags)
