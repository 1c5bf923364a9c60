"""The merge pipeline: resolve sources -> check compatibility -> download -> plan -> merge shards -> finalize; for
``output: adapter`` recipes, download the adapters -> combine them into one adapter folder.

Run it with ``mergeflow run RECIPE OUT``, on a schedule with ``mergeflow serve RECIPE --cron ...``, or call it:

    >>> merge_pipeline(recipe=Path("recipes/ties.yaml"), out=Path("merged/ties"))
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from prefect import flow, unmapped
from prefect.runtime import flow_run

from flows.runners import default_task_runner
from merge_ops.compatibility import CompatibilityReport
from merge_ops.headers import ModelHeaders
from merge_ops.output_folder import output_lock, recipe_inputs
from merge_ops.plan import DEFAULT_SHARD_SIZE
from merge_ops.recipe import Recipe
from mergeflow import settings
from mergeflow.run_summary import RunSummary
from mergeflow.sources import Source
from tasks.checks import check_compatibility, check_weight_space
from tasks.recipe import load_recipe
from tasks.shards import finalize_model, merge_shard, plan_shards
from tasks.sources import check_pins, download_model, read_model_headers, resolve_model
from tasks.summary import merge_adapter, summarize_run


class PreparedSources(NamedTuple):
    """The recipe's models, pinned, checked and downloaded: what every merge of the recipe starts from."""

    sources: list[Source]
    headers: list[ModelHeaders]
    report: CompatibilityReport


def pin_sources(recipe: Recipe, endpoint: str | None) -> list[Source]:
    """Pin every model of the recipe to a commit (Hub) or a folder (local), downloading nothing (tasks, inside the calling flow)."""
    return resolve_model.map(recipe.referenced_models, unmapped(recipe.base_dir), unmapped(endpoint), unmapped(recipe.base_model)).result()


def prepare_sources(
    recipe: Recipe, endpoint: str | None, cache_dir: Path | None, extra_patterns: list[str] | None = None, pinned: list[Source] | None = None,
    allow_crimes: bool = False,
) -> PreparedSources:
    """The tasks every merge starts with, inside the calling flow: the recipe's models, checked and local.

    ``pinned``: the recipe's models already pinned (``pin_sources``, e.g. by the DVC resolve stage), merged at exactly those commits.
    """
    resolved = pin_sources(recipe, endpoint) if pinned is None else check_pins(recipe, pinned)

    # Check compatibility from configs and safetensors headers, before any weight is downloaded
    headers = read_model_headers.map(resolved, unmapped(endpoint), unmapped(cache_dir)).result()
    report = check_compatibility(recipe, headers, allow_crimes=allow_crimes)

    # Download the weights, then check each model is a fine-tune of the base (an adapter merge needs only the adapters)
    adapters_only = recipe.output == "adapter"
    sources = download_model.map(resolved, unmapped(endpoint), unmapped(cache_dir), unmapped(extra_patterns), unmapped(adapters_only)).result()
    return PreparedSources(sources, headers, report if adapters_only else check_weight_space(recipe, report, headers, sources))


def _run_name() -> str:
    return f"merge-{Path(str(flow_run.parameters['out'])).name}"


@flow(name="merge_pipeline", flow_run_name=_run_name, task_runner=default_task_runner())
def merge_pipeline(
    recipe: Path,
    out: Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    compute_dtype: str = "float32",
    force: bool = False,
    device: str = "cpu",
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    extra_patterns: list[str] | None = None,
    pinned: list[Source] | None = None,
    allow_nonfinite: bool = False,
    allow_crimes: bool = False,
) -> RunSummary:
    """Merge the models of a mergekit-format recipe into the folder ``out``.

    Args:
        recipe: YAML recipe; relative local model paths are tried against its folder.
        out: output folder, written in a staging folder next to it and renamed when complete.
        shard_size: maximum bytes per output shard; shards are merged in parallel.
        compute_dtype: float32, bfloat16 or float16 arithmetic.
        force: replace ``out`` if it exists, unless it is or contains an input (a model, adapter, the recipe, the cache).
        device: cpu, cuda or cuda:N.
        endpoint: Hub URL (default HF_ENDPOINT); cache_dir: download cache (default MERGEFLOW_HF_CACHE).
        extra_patterns: more files to download, e.g. ``["*.bin"]`` (never downloaded otherwise).
        pinned: the recipe's models already pinned (``pin_sources``): merged at these commits instead of resolving them again.
        allow_nonfinite: merge sources holding NaN or infinite values and write such results (by default an error).
        allow_crimes: merge models of another architecture or model_type than the reference (by default a compatibility problem).
    """
    # Load the recipe; pin, check, download and check the models again in weight space
    parsed = load_recipe(recipe)
    sources, headers, report = prepare_sources(parsed, endpoint, cache_dir, extra_patterns, pinned, allow_crimes)
    if parsed.output == "adapter":  # adapters of one base combined into one adapter: their factors only
        return merge_adapter(parsed, sources, report, out, device, force, allow_nonfinite)

    # Holding OUT's lock: plan into a staging folder; merge the shards in parallel (shards already there are skipped)
    inputs = recipe_inputs(parsed) + [s.path for s in sources if s.path is not None] + [settings.download_cache(cache_dir)]
    with output_lock(out):
        staging = plan_shards(parsed, headers, sources, report, out, shard_size, compute_dtype, force, inputs)
        shard_task = merge_shard.with_options(result_storage=staging.results_dir)
        results = shard_task.map(unmapped(staging), range(len(staging.shard_files)), unmapped(device), unmapped(allow_nonfinite)).result()

        # Finalize (index, config, tokenizer, card), move into place, report
        final = finalize_model(staging, results, force)
    return summarize_run(parsed, sources, report, staging, results, final)
