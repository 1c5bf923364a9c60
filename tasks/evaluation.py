"""The evaluation tasks: lm-eval on one model folder (cached by content), and the report of a merge's scores."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from mergeflow.evaluation import EvalResult, EvalSettings, evaluate_model, evaluation_report, plus_minus
from tasks.retries import LOCAL


@task(name="evaluate_model", task_run_name="evaluate-{label}", **LOCAL)
def evaluate_model_task(model_dir: Path, evaluation: EvalSettings, label: str, cache_dir: Path | None = None, base: Path | None = None) -> EvalResult:
    """lm-eval on one model folder, or on a PEFT adapter folder applied to ``base`` (cached by content hash and settings)."""
    result = evaluate_model(model_dir, **evaluation.model_dump(), base=base, cache_dir=cache_dir)
    scores = ", ".join(f"{t} {plus_minus(v, result.stderrs.get(t), 3)}" for t, v in result.scores.items())
    get_run_logger().info("%s: %s (%s)", label, scores, "cached" if result.cached else f"{result.seconds:.1f} s")
    return result


@task(name="report_evaluation", **LOCAL)
def report_evaluation(merged: EvalResult, sources: dict[str, EvalResult], names: dict[str, str]) -> None:
    """The merged model's scores beside its sources', as a Prefect artifact."""
    create_markdown_artifact(evaluation_report(merged, sources, names), key="evaluation-report", description=f"lm-eval of {merged.model_dir.name}")
