"""Tasks of the checks: compatibility from headers (before any download), then weight space (weights local)."""
from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from merge_ops.compatibility import CompatibilityReport, compatibility_report
from merge_ops.headers import ModelHeaders
from merge_ops.recipe import Recipe
from merge_ops.weight_space import weight_space_report
from mergeflow.sources import Source, local_headers
from tasks.retries import LOCAL


@task(name="check_compatibility", **LOCAL)
def check_compatibility(recipe: Recipe, headers: list[ModelHeaders], stop_on_problems: bool = True, allow_crimes: bool = False) -> CompatibilityReport:
    """Compare the models' headers; the report becomes an artifact; a problem stops the flow unless told otherwise."""
    report = compatibility_report(recipe, {h.key: h for h in headers}, allow_crimes=allow_crimes)
    create_markdown_artifact(report.markdown(), key="compatibility-report", description="Can these models be merged?")
    for finding in report.findings:
        get_run_logger().log(30 if finding.severity != "note" else 20, "%s: %s", finding.severity, finding)
    if stop_on_problems:
        report.raise_for_problems()
    return report


@task(name="check_weight_space", **LOCAL)
def check_weight_space(recipe: Recipe, report: CompatibilityReport, headers: list[ModelHeaders], sources: list[Source]) -> CompatibilityReport:
    """Measure how far each downloaded model is from the base; updates the compatibility artifact."""
    updated = weight_space_report(recipe, report, local_headers(headers, sources))
    for d in updated.weight_space:
        get_run_logger().log(20 if d.fine_tuned else 30, "%s: cosine %.4f, relative distance %.4f from the base%s",
                             d.model, d.cosine, d.relative_distance, "" if d.fine_tuned else " -> not fine-tuned from this base")
    if updated.weight_space:
        create_markdown_artifact(updated.markdown(), key="compatibility-report", description="Can these models be merged? (with weight space)")
    return updated
