"""What the DVC stages hand each other (dvc.yaml): the recipe as merged, the pinned sources, scores, the release.

Every file a stage declares as an output is a function of its inputs only (no times, no absolute paths),
so ``dvc repro`` on another clone records the same hashes. Timings go to ``outputs/logs`` (not versioned).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from pydantic import BaseModel

from merge_ops.recipe_file import parse_recipe_yaml, read_recipe_text
from merge_ops.recipe_variants import vary_recipe
from mergeflow.evaluation import EvalResult, mean_score, mean_score_stderr
from mergeflow.files import write_atomic
from mergeflow.gate import GateDecision, Outcome
from mergeflow.hub import Published
from mergeflow.params import MergeParams
from mergeflow.run_summary import RunSummary
from mergeflow.sources import Source
from mergeflow.tracking import MergeStats


def _relative(path: Path | None) -> str | None:
    """``path`` relative to the working directory when it lies under it (the repository root under DVC)."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd().resolve())) if resolved.is_relative_to(Path.cwd().resolve()) else str(resolved)


class SourcesRecord(BaseModel):
    """The models merged, pinned: Hub repo and commit, or a folder relative to the repository root."""

    sources: list[Source]


class OutcomeRecord(BaseModel):
    """What the publish stage decided and did (no URL: the embedded Hub's port changes from run to run)."""

    outcome: Outcome
    gate_passed: bool
    gate_reasons: list[str]
    repo_id: str | None = None
    commit_sha: str | None = None


def write_recipe_variant(params: MergeParams, out: Path, rename: dict[str, str] | None = None) -> Path:
    """The recipe of ``params`` with its method and parameter overrides applied, written to ``out``.

    ``rename`` replaces model reference prefixes, e.g. ``{"demo-family/": "demo/"}`` to read the demo
    family's local folders as Hub repos.
    """
    text = read_recipe_text(params.recipe)
    for old, new in (rename or {}).items():
        text = text.replace(f" {old}", f" {new}")
    variant = vary_recipe(parse_recipe_yaml(text, source=str(params.recipe)), method=params.method, parameters=params.parameters, source=str(params.recipe))
    note = f"# {params.recipe} with merge.method={params.method} and merge.parameters={params.parameters} (params.yaml)\n"
    return write_atomic(out, note + variant.yaml())


def write_sources_record(sources: list[Source], out: Path) -> Path:
    """The pinned sources (folders relative to the working directory); the base is the recipe's to say."""
    def relative(s: Source) -> Source:
        return s.model_copy(update={"path": _relative(s.path), "adapter": relative(s.adapter) if s.adapter else None})

    pinned = [relative(s) for s in sources]
    text = SourcesRecord(sources=pinned).model_dump_json(indent=2, exclude={"sources": {"__all__": {"is_base": True, "adapter": {"is_base"}}}})
    return write_atomic(out, text + "\n")


def read_sources_record(path: Path) -> list[Source]:
    """The sources written by the merge stage; relative folders are taken from the working directory."""
    record = SourcesRecord.model_validate_json(Path(path).read_text())
    def located(s: Source) -> Source:
        return s.model_copy(update={"path": Path(s.path).resolve() if s.path else None, "adapter": located(s.adapter) if s.adapter else None})

    return [located(s) for s in record.sources]


def write_merge_log(summary: RunSummary, out: Path) -> Path:
    """The merge's full summary (timings included): not a DVC output, read for the MLflow stats."""
    return write_atomic(out, summary.model_dump_json(indent=2) + "\n")


def read_merge_stats(path: Path) -> MergeStats | None:
    """Merge time and throughput from the merge stage's log, when this workspace ran it (None after ``dvc pull``)."""
    if not Path(path).is_file():
        return None
    return MergeStats.from_summary(RunSummary.model_validate_json(Path(path).read_text()))


def write_scores(merged: EvalResult, sources: dict[str, EvalResult], metrics_out: Path, plot_out: Path) -> dict[str, object]:
    """DVC metrics (merged scores, mean, gain over the best source, standard errors) and a per-task plot table (merged vs best source).

    Scores are each task's primary metric, groups left out; the mean is over those tasks. ``stderr`` holds
    lm-eval's standard errors of the same scores (a task without one is left out) and of the merged mean.
    """
    tasks = list(merged.task_scores)
    best = max((mean_score(r.task_scores) for r in sources.values()), default=0.0)
    metrics: dict[str, object] = {
        "merged": merged.task_scores,
        "mean": mean_score(merged.task_scores),
        "best_source_mean": best,
        "gain": mean_score(merged.task_scores) - best,
        "sources": {key: r.task_scores for key, r in sources.items()},
        "stderr": {
            "merged": merged.task_stderrs,
            "mean": mean_score_stderr(merged.task_stderrs, tasks),
            "sources": {key: r.task_stderrs for key, r in sources.items()},
        },
    }
    rows = [{"task": t, "merged": merged.task_scores[t], "best_source": max((r.task_scores[t] for r in sources.values()), default=0.0)} for t in tasks]
    write_atomic(plot_out, json.dumps(rows, indent=2) + "\n")
    write_atomic(metrics_out, json.dumps(metrics, indent=2) + "\n")
    return metrics


def make_release(merged: Path, release: Path) -> Path:
    """A copy of ``merged`` at ``release`` for the Hub card to be written into (weights hard-linked, not copied).

    The merge stage's output stays as it was; the folder appears complete or not at all.
    """
    staging = release.with_name(f".{release.name}.{uuid.uuid4().hex}.partial")
    shutil.copytree(merged, staging, copy_function=lambda src, dst: os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst))
    if release.exists():
        shutil.rmtree(release)
    os.replace(staging, release)
    return release


def write_outcome(outcome: Outcome, decision: GateDecision, published: Published | None, out: Path) -> Path:
    record = OutcomeRecord(
        outcome=outcome, gate_passed=decision.passed, gate_reasons=list(decision.reasons),
        repo_id=published.repo_id if published else None, commit_sha=published.commit_sha if published else None,
    )
    return write_atomic(out, record.model_dump_json(indent=2) + "\n")
