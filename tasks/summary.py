"""The run's report for people: sources and their commits, compatibility, shards, time and throughput."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from tasks.compatibility import CompatibilityReport
from tasks.shards import ShardResult, Staging
from tasks.sources import ResolvedSource


class RunSummary(BaseModel):
    out: Path
    plan_sha256: str
    sources: list[ResolvedSource]
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
        for s in self.sources:
            lines.append(f"| `{s.key}` | {s.repo_id or '(local)'} | {s.revision or ('main' if s.repo_id else '-')} | {s.commit_sha or '-'} | `{s.path}` |")
        compat = "compatible" if report.compatible else "not compatible"
        notes = [f"- {f.severity}: {f}" for f in report.findings if f.severity != "note"]
        lines += ["", f"## Compatibility: {compat}", "", *(notes or ["- no warnings"])]
        lines += [f"- `{d.model}`: cosine {d.cosine:.4f}, relative distance {d.relative_distance:.4f} from the base" for d in report.weight_space]
        lines += ["", "## Shards", "", "| shard | MB | seconds | sha256 | |", "|---|---|---|---|---|"]
        for s in self.shards:
            lines.append(f"| {s.file} | {s.nbytes / 1e6:.1f} | {s.seconds:.2f} | `{s.sha256}` | {'resumed' if s.index in self.resumed else ''} |")
        return "\n".join(lines) + "\n"


def _flow_started() -> float:
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.get_id())
    return run.start_time.timestamp() if run.start_time else time.time()


@task(name="summarize_run", cache_policy=NO_CACHE, persist_result=False)
def summarize_run(sources: list[ResolvedSource], report: CompatibilityReport, staging: Staging, results: list[ShardResult], out: Path) -> RunSummary:
    """Publish the run summary artifact and return it."""
    fresh = [r for r in results if r.index not in staging.done_before]
    merge_seconds = max((r.started + r.seconds for r in fresh), default=0.0) - min((r.started for r in fresh), default=0.0)
    summary = RunSummary(
        out=out, plan_sha256=staging.plan_sha256, sources=sources, shards=results, resumed=staging.done_before,
        total_size=staging.total_size, input_bytes=staging.input_bytes, tensor_count=staging.tensor_count,
        merge_seconds=merge_seconds, pipeline_seconds=time.time() - _flow_started(),
        warnings=[str(f) for f in report.findings if f.severity == "warning"], compatibility=report,
    )
    create_markdown_artifact(summary.markdown(report), key="merge-summary", description=f"merge into {out}")
    get_run_logger().info("merged %s: %.2f GB in %.1f s", out, summary.total_size / 1e9, summary.pipeline_seconds)
    return summary
