"""The run's report for people: sources and their commits, compatibility, shards, time and throughput."""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from merge_ops.compatibility import CompatibilityReport
from merge_ops.recipe import Recipe
from mergeflow.sources import Source
from mergeflow.staging import ShardResult, Staging


class RunSummary(BaseModel):
    out: Path
    recipe: Recipe
    """The recipe as loaded by the run (its text and file travel with it in memory, not in JSON)."""
    plan_sha256: str
    sources: list[Source]
    shards: list[ShardResult]
    resumed: list[int]
    total_size: int
    input_bytes: int
    tensor_count: int
    merge_seconds: float
    """Wall time of the shards merged by this run (first start to last end); 0 if all were already done."""
    pipeline_seconds: float
    warnings: list[str]
    compatibility: CompatibilityReport | None = None
    """The compatibility report, with the weight-space check when there is a base."""

    @property
    def throughput(self) -> float:
        """Bytes written per second by this run's shard tasks."""
        fresh = sum(s.nbytes for s in self.shards if s.index not in self.resumed)
        return fresh / self.merge_seconds if self.merge_seconds else 0.0

    def markdown(self, report: CompatibilityReport) -> str:
        lines = [f"# Merged `{self.out}`", "",
                 f"{self.tensor_count} tensors, {self.total_size / 1e9:.3f} GB written from {self.input_bytes / 1e9:.3f} GB read; "
                 f"pipeline {self.pipeline_seconds:.1f} s, shards {self.merge_seconds:.1f} s ({self.throughput / 1e6:.0f} MB/s written). "
                 f"Plan `{self.plan_sha256[:12]}`" + (f"; resumed with {len(self.resumed)} shard(s) already merged." if self.resumed else "."),
                 "", "## Sources", "", "| reference | repo | requested revision | commit | local folder |", "|---|---|---|---|---|"]
        for source in self.sources:
            for s, role in [(source, f"`{source.key}`"), *([(source.adapter, "its adapter")] if source.adapter else [])]:
                lines.append(f"| {role} | {s.repo_id or '(local)'} | {s.revision or ('main' if s.repo_id else '-')} | {s.commit_sha or '-'} | `{s.path}` |")
        compat = "compatible" if report.compatible else "not compatible"
        notes = [f"- {f.severity}: {f}" for f in report.findings if f.severity != "note"]
        lines += ["", f"## Compatibility: {compat}", "", *(notes or ["- no warnings"])]
        lines += [f"- `{d.model}`: cosine {d.cosine:.4f}, relative distance {d.relative_distance:.4f} from the base" for d in report.weight_space]
        lines += ["", "## Shards", "", "| shard | MB | seconds | sha256 | |", "|---|---|---|---|---|"]
        for shard in self.shards:
            resumed = "resumed" if shard.index in self.resumed else ""
            lines.append(f"| {shard.file} | {shard.nbytes / 1e6:.1f} | {shard.seconds:.2f} | `{shard.sha256}` | {resumed} |")
        return "\n".join(lines) + "\n"


def summarize(
    recipe: Recipe, sources: list[Source], report: CompatibilityReport, staging: Staging, results: list[ShardResult], out: Path, *, started_at: float
) -> RunSummary:
    """The summary of a run that started at ``started_at`` (a timestamp) and has just finished."""
    fresh = [r for r in results if r.index not in staging.done_before]
    merge_seconds = max((r.started + r.seconds for r in fresh), default=0.0) - min((r.started for r in fresh), default=0.0)
    return RunSummary(
        out=out, recipe=recipe, plan_sha256=staging.plan_sha256, sources=sources, shards=results, resumed=staging.done_before,
        total_size=staging.total_size, input_bytes=staging.input_bytes, tensor_count=staging.tensor_count,
        merge_seconds=merge_seconds, pipeline_seconds=time.time() - started_at,
        warnings=[str(f) for f in report.findings if f.severity == "warning"], compatibility=report,
    )
