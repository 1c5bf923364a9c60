"""``mergeflow stage resolve|merge|evaluate|publish``: the stages of dvc.yaml, run by ``dvc repro`` in the project folder.

Paths are those dvc.yaml declares (under ``outputs/``); settings come from params.yaml.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from mergeflow.cli.console_errors import console, friendly_errors

OUTPUTS = Path("outputs")
FAMILY, HUB, MERGED, RELEASE = OUTPUTS / "demo-family", OUTPUTS / "hub", OUTPUTS / "merged", OUTPUTS / "release"
RECIPE, PINS, SOURCES = OUTPUTS / "recipe.yaml", OUTPUTS / "pins.json", OUTPUTS / "sources.json"
METRICS, PLOT, OUTCOME = Path("metrics/eval.json"), Path("metrics/scores.json"), Path("metrics/publish.json")
"""Small JSON files kept in git (not in outputs/), as DVC metrics are, so experiments carry them."""
MERGE_LOG, HF_CACHE = OUTPUTS / "logs" / "merge-summary.json", OUTPUTS / "hf-cache"
DEMO_NAMESPACE = "demo"

stage_app = typer.Typer(help="The stages of dvc.yaml (`dvc repro` runs them in the project folder).", no_args_is_help=True)
Params = Annotated[Path, typer.Option(help="The params file (merge:, hub:, eval:, gate:, publish:).")]


@contextmanager
def hub_endpoint(params: Path) -> Iterator[str | None]:
    """The Hub of ``hub.endpoint``. For ``local``: a Hub-compatible server over outputs/hub while in use, holding
    the demo family of outputs/demo-family as ``demo/NAME`` (pushed now; unchanged files make no new commit)."""
    from mergeflow.demo_family.build import family_models
    from mergeflow.hub import publish_model
    from mergeflow.local_hub import LocalHub
    from mergeflow.params import HubParams

    hub = HubParams.from_params(params)
    if not hub.is_local:
        yield hub.endpoint
        return
    with LocalHub(HUB.absolute()) as server:
        for name, folder in family_models(FAMILY).items():
            publish_model(folder, repo_id=f"{DEMO_NAMESPACE}/{name}", endpoint=server.endpoint)
        console.print(f"local Hub server: {server.endpoint} (storage {HUB}), with the demo family as {DEMO_NAMESPACE}/*")
        yield server.endpoint


def _rename(params: Path) -> dict[str, str] | None:
    """With the embedded Hub, the recipe's ``demo-family/NAME`` models are read as ``demo/NAME``."""
    from mergeflow.params import HubParams

    return {f"{FAMILY.name}/": f"{DEMO_NAMESPACE}/"} if HubParams.from_params(params).is_local else None


@stage_app.command("resolve")
@friendly_errors
def resolve(params: Params = Path("params.yaml")) -> None:
    """Write the recipe of ``merge:`` to outputs/recipe.yaml and its models pinned now to outputs/pins.json."""
    from flows.stages import resolve_stage

    with hub_endpoint(params) as endpoint:
        pinned = resolve_stage(params_file=params.absolute(), recipe_out=RECIPE.absolute(), pins_out=PINS.absolute(), endpoint=endpoint,
                               rename=_rename(params))
    for source in pinned:
        console.print(f"{source.key} -> {source.label}", highlight=False)


@stage_app.command("merge")
@friendly_errors
def merge(params: Params = Path("params.yaml")) -> None:
    """Merge outputs/recipe.yaml at the commits of outputs/pins.json into outputs/merged; write outputs/sources.json."""
    from flows.stages import merge_stage
    from mergeflow.cli.staging_progress import StagingProgress

    with hub_endpoint(params) as endpoint, StagingProgress(MERGED, console):
        summary = merge_stage(
            params_file=params.absolute(), recipe=RECIPE.absolute(), pins=PINS.absolute(), out=MERGED.absolute(), sources_out=SOURCES.absolute(),
            log_out=MERGE_LOG.absolute(), endpoint=endpoint, cache_dir=HF_CACHE.absolute(),
        )
    console.print(f"merged {summary.tensor_count} tensors into {MERGED} in {summary.pipeline_seconds:.1f} s (plan {summary.plan_sha256[:12]})")


@stage_app.command("evaluate")
@friendly_errors
def evaluate(params: Params = Path("params.yaml")) -> None:
    """lm-eval on outputs/merged and its sources; write metrics/eval.json and metrics/scores.json."""
    from flows.stages import evaluate_stage

    with hub_endpoint(params) as endpoint:
        metrics = evaluate_stage(
            params_file=params.absolute(), merged=MERGED.absolute(), sources_file=SOURCES.absolute(),
            metrics_out=METRICS.absolute(), plot_out=PLOT.absolute(), endpoint=endpoint, cache_dir=HF_CACHE.absolute(),
        )
    console.print(f"merged {metrics['merged']}: mean {metrics['mean']:.4f}, {metrics['gain']:+.4f} over the best source")


@stage_app.command("publish")
@friendly_errors
def publish(params: Params = Path("params.yaml")) -> None:
    """Card, MLflow run, gate and (when it passes) Hub upload of outputs/release; the outcome in metrics/publish.json."""
    from flows.stages import publish_stage

    with hub_endpoint(params) as endpoint:
        result = publish_stage(
            params_file=params.absolute(), merged=MERGED.absolute(), recipe=RECIPE.absolute(), sources_file=SOURCES.absolute(),
            release=RELEASE.absolute(), outcome_out=OUTCOME.absolute(), log_file=MERGE_LOG.absolute(), endpoint=endpoint,
            cache_dir=HF_CACHE.absolute(),
        )
    gate = "passed" if result.gate.passed else "failed: " + "; ".join(result.gate.reasons)
    where = f"published {result.published.repo_id} @ {result.published.commit_sha}" if result.published else "not published"
    console.print(f"gate {gate}; {where}; MLflow run {result.run.run_id}")
