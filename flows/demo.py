"""The embedded default: the whole pipeline on the offline skills family, against a Hub-compatible server.

Build the family -> push it to the Hub -> merge two skill models from their Hub ids (download -> check ->
shards -> finalize) -> evaluate -> track in MLflow -> gate -> publish.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped

from flows.merge_evaluate_publish import PipelineResult, merge_evaluate_publish
from tasks.demo import build_demo_family, push_demo_model, write_demo_recipe

PROJECT = Path(__file__).resolve().parents[1]
TEMPLATE = PROJECT / "recipes" / "skills-task-arithmetic.yaml"
MERGED_REPO = "demo/skills-merged"


@flow(name="demo", flow_run_name="demo")
def demo(workdir: Path, endpoint: str, template: Path = TEMPLATE, publish_repo: str = MERGED_REPO) -> PipelineResult:
    """Run the pipeline end to end on the demo family; everything is written under ``workdir``."""
    # Build the family (cached) and push it to the Hub
    family = build_demo_family(workdir / "demo-family")
    push_demo_model.map(list(family), [family[n] for n in family], unmapped(endpoint)).result()

    # Merge from Hub ids, evaluate, track, gate, publish
    recipe = write_demo_recipe(template, workdir / "recipes" / template.name, "demo-family")
    return merge_evaluate_publish(
        recipe=recipe, out=workdir / "merged" / recipe.stem, publish_repo=publish_repo, force=True,
        endpoint=endpoint, cache_dir=workdir / "hf-cache",
    )
