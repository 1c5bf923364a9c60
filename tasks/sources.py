"""Tasks of the sources: pin each model to a commit or folder, read its headers, download it (Hub calls retry)."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from merge_ops.headers import ModelHeaders
from merge_ops.recipe import ModelRef, Recipe
from mergeflow.sources import Source, download_source, matching_pins, read_source_headers, resolve_source
from tasks.retries import LOCAL, NETWORK


@task(name="resolve_model", task_run_name="resolve-{ref}", **NETWORK)
def resolve_model(ref: ModelRef, base_dir: Path, endpoint: str | None = None, base: ModelRef | None = None) -> Source:
    """Pin a model reference (and its adapter) to a commit sha (Hub) or a folder (local; relative paths: cwd, then
    ``base_dir``); an adapter listed alone is applied to ``base``, the recipe's base model."""
    source = resolve_source(ref, base_dir=base_dir, endpoint=endpoint, base=base)
    get_run_logger().info("%s -> %s", ref.key, source.label)
    return source


@task(name="read_model_headers", task_run_name="read-headers-{source.key}", **NETWORK)
def read_model_headers(source: Source, endpoint: str | None = None, cache_dir: Path | None = None) -> ModelHeaders:
    """config.json, card and safetensors headers of one model, without its weights."""
    return read_source_headers(source, endpoint=endpoint, cache_dir=cache_dir)


@task(name="download_model", task_run_name="download-{source.key}", **NETWORK)
def download_model(
    source: Source, endpoint: str | None = None, cache_dir: Path | None = None, extra_patterns: list[str] | None = None, adapter_only: bool = False,
) -> Source:
    """Download a Hub model (or only its adapter) at its pinned commit; local folders pass through."""
    downloaded = download_source(source, endpoint=endpoint, cache_dir=cache_dir, extra_patterns=extra_patterns, adapter_only=adapter_only)
    if source.repo_id is not None or (source.adapter and source.adapter.repo_id is not None):
        get_run_logger().info("downloaded %s to %s", source.label, downloaded.path)
    return downloaded


@task(name="check_pins", **LOCAL)
def check_pins(recipe: Recipe, pinned: list[Source]) -> list[Source]:
    """The recipe's models as ``pinned`` (one per reference, in the recipe's order)."""
    return matching_pins(recipe.referenced_models, pinned)
