"""The DVC stages of dvc.yaml as flows: resolve -> merge -> evaluate -> publish (the family stage is ``mergeflow demo-models``).

Each reads its settings from params.yaml and writes only what dvc.yaml declares, plus logs under
``outputs/logs``. ``mergeflow stage merge|evaluate|publish`` runs them; ``dvc repro`` runs those commands.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped

from flows.evaluate_publish import EvaluatePublishResult, evaluate_merge, evaluate_track_publish
from flows.merge_pipeline import merge_pipeline, pin_sources
from mergeflow.evaluation import EvalSettings
from mergeflow.hub import PublishTarget
from mergeflow.params import MergeParams, PublishParams
from mergeflow.run_summary import RunSummary
from mergeflow.sources import Source
from tasks.recipe import load_recipe
from tasks.sources import download_model
from tasks.stage_records import (
    make_release,
    read_merge_stats,
    read_sources_record,
    write_merge_log,
    write_outcome,
    write_recipe_variant,
    write_scores,
    write_sources_record,
)


@flow(name="resolve_stage", flow_run_name="dvc-resolve")
def resolve_stage(params_file: Path, recipe_out: Path, pins_out: Path, endpoint: str | None = None, rename: dict[str, str] | None = None) -> list[Source]:
    """Write the recipe of ``merge:`` (with its overrides) and its models pinned now (Hub commits, local folders).

    Runs on every ``dvc repro`` (``always_changed``); the merge stage depends on both files, so it re-merges exactly when
    the recipe changed or a source moved upstream.

    Args:
        rename: model reference prefixes to replace in the recipe, e.g. ``{"demo-family/": "demo/"}`` to read
            the demo family's folders as the Hub repos it was pushed to (the embedded default).
    """
    recipe = load_recipe(write_recipe_variant(MergeParams.from_params(params_file), recipe_out, rename))
    pinned = pin_sources(recipe, endpoint)
    write_sources_record(pinned, pins_out)
    return pinned


@flow(name="merge_stage", flow_run_name="dvc-merge")
def merge_stage(
    params_file: Path, recipe: Path, pins: Path, out: Path, sources_out: Path, log_out: Path,
    endpoint: str | None = None, cache_dir: Path | None = None,
) -> RunSummary:
    """Merge ``recipe`` (the resolve stage's) at the commits of ``pins`` into ``out``; record the sources as downloaded."""
    params = MergeParams.from_params(params_file)
    summary = merge_pipeline(
        recipe=recipe, out=out, shard_size=params.shard_size, compute_dtype=params.compute_dtype, force=True,
        endpoint=endpoint, cache_dir=cache_dir, pinned=read_sources_record(pins),
    )
    write_sources_record(summary.sources, sources_out)
    write_merge_log(summary, log_out)
    return summary


def _sources(sources_file: Path, endpoint: str | None, cache_dir: Path | None) -> list[Source]:
    """The merge stage's pinned sources, downloaded again where this workspace lacks them (after ``dvc pull``)."""
    return download_model.map(read_sources_record(sources_file), unmapped(endpoint), unmapped(cache_dir)).result()


@flow(name="evaluate_stage", flow_run_name="dvc-evaluate")
def evaluate_stage(
    params_file: Path, merged: Path, sources_file: Path, metrics_out: Path, plot_out: Path,
    endpoint: str | None = None, cache_dir: Path | None = None,
) -> dict[str, object]:
    """Evaluate the merged model and every source with the ``eval:`` settings; write DVC metrics and plot data."""
    evaluation = EvalSettings.from_params(params_file)
    sources = _sources(sources_file, endpoint, cache_dir)
    merged_result, results = evaluate_merge(merged, sources, evaluation)
    return write_scores(merged_result, results, metrics_out, plot_out)


@flow(name="publish_stage", flow_run_name="dvc-publish")
def publish_stage(
    params_file: Path, merged: Path, recipe: Path, sources_file: Path, release: Path, outcome_out: Path, log_file: Path,
    endpoint: str | None = None, cache_dir: Path | None = None,
) -> EvaluatePublishResult:
    """Card -> MLflow run -> gate -> publish (``publish:``, ``gate:``), on a release copy of the merged model.

    A failed gate is recorded (MLflow, ``outcome_out``) and publishes nothing; the stage still succeeds.
    """
    target = PublishParams.from_params(params_file)
    sources = _sources(sources_file, endpoint, cache_dir)
    folder = make_release(merged, release)
    result = evaluate_track_publish(
        merged_dir=folder, recipe=load_recipe(recipe), sources=sources, stats=read_merge_stats(log_file), params_file=params_file,
        publish=PublishTarget(repo_id=target.repo, private=target.private, endpoint=endpoint) if target.repo else None,
        model_name=(target.repo or recipe.stem).split("/")[-1], fail_on_gate=False, endpoint=endpoint,
    )
    write_outcome(result.outcome, result.gate, result.published, outcome_out)
    return result
