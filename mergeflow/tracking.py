"""MLflow tracking of merged models: one run per merged artefact, a registered model version carrying its lineage.

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server with a database, for teams), else a local one
kept in one folder, ``./mlruns`` (``MERGEFLOW_MLRUNS``): a SQLite database ``mlruns/mlflow.db`` and the
artifacts under ``mlruns/artifacts/``. Browse it with
``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

A run holds
- params: the flattened recipe (``merge_method``, ``models.0.parameters.weight``, ...), ``eval.*`` and ``gate.*``;
- metrics: every lm-eval metric of the merged model (``eval/merged/<task>/<metric>``) and of each source
  (``eval/source/<name>/<task>/<metric>``), ``merge/seconds``, ``merge/throughput_bytes_per_s``,
  ``merge/peak_rss_bytes``, ``merge/output_bytes``, ``gate/passed``;
- tags: the lineage (``mergeflow.source.<i>.*`` with repo ids and commits, ``mergeflow.source.<i>.adapter.*`` for an adapter, ``mergeflow.base_model``,
  ``mergeflow.recipe_sha256``, ``mergeflow.output_hash``, ``mergeflow.dvc_hash``, ``mergeflow.git_commit``,
  ``mergeflow.prefect.flow_run_id``), then the outcome (``mergeflow.gate``, ``mergeflow.hub.commit``);
- artifacts: ``recipe/``, ``model/`` (card, config and ``model_ref.json``: where the weights are, by path and
  content hash - the registered version's source, so the weights are never stored twice), ``eval/`` (raw
  lm-eval JSON per model), ``compatibility/``, ``charts/scores.png``, ``lineage.json``, ``gate.json``.
"""
from __future__ import annotations

import json
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from merge_ops.compatibility import CompatibilityReport
from merge_ops.recipe import Recipe
from mergeflow import settings
from mergeflow.errors import TrackingError
from mergeflow.evaluation import EvalResult, EvalSettings
from mergeflow.gate import GateDecision, GatePolicy, Outcome
from mergeflow.hub import Published
from mergeflow.lineage import Lineage
from mergeflow.run_summary import RunSummary
from mergeflow.sources import Source

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG = "mergeflow."
_INVALID_NAME = re.compile(r"[^\w\-. :/]")
_BATCH = 100


class MergeStats(BaseModel):
    """How the merge ran; every field is optional (what the caller does not know is not logged)."""

    merge_seconds: float | None = None
    pipeline_seconds: float | None = None
    throughput_bytes_per_s: float | None = None
    peak_rss_bytes: int | None = None
    plan_sha256: str | None = None

    @classmethod
    def from_summary(cls, summary: RunSummary, *, peak_rss_bytes: int | None = None) -> MergeStats:
        """From the merge pipeline's ``RunSummary``; the peak RSS defaults to this process's so far."""
        return cls(
            merge_seconds=summary.merge_seconds, pipeline_seconds=summary.pipeline_seconds,
            throughput_bytes_per_s=summary.throughput, peak_rss_bytes=peak_rss_bytes or process_peak_rss(),
            plan_sha256=summary.plan_sha256,
        )


class TrackedRun(BaseModel):
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_name: str
    model_version: str
    artifact_uri: str


class VersionLineage(BaseModel):
    """One registered version: sources -> merged -> published."""

    version: str
    run_id: str | None
    method: str | None
    output_hash: str | None
    recipe_sha256: str | None
    sources: list[Source]
    gate: str | None
    gate_reasons: str | None
    outcome: str | None
    hub_repo_id: str | None
    hub_commit: str | None
    hub_url: str | None


class LineageTree(BaseModel):
    name: str
    tracking_uri: str
    versions: list[VersionLineage]


def process_peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else MLFLOW_TRACKING_URI, else the local store ``sqlite:///<MLRUNS_DIR>/mlflow.db`` (folder created)."""
    if uri or settings.MLFLOW_TRACKING_URI:
        return str(uri or settings.MLFLOW_TRACKING_URI)
    root = Path(settings.MLRUNS_DIR).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _local_root(uri: str) -> Path | None:
    """The store folder of a local SQLite URI (its artifacts go next to the database)."""
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


@contextmanager
def refusals(uri: str) -> Iterator[None]:
    """MLflow's 4xx answers (not found, unauthorised, invalid) as TrackingError, which is not retried."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        status = int(err.get_http_status_code())  # type: ignore[no-untyped-call]
        if 400 <= status < 500 and status != 429:
            raise TrackingError(uri, err.message) from err
        raise


def client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow: MlflowClient, uri: str, name: str | None = None) -> str:
    """The experiment's id, created if needed (in a local store, with its artifacts under the store's folder)."""
    from mlflow.exceptions import MlflowException

    name = name or settings.MLFLOW_EXPERIMENT
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = _local_root(uri)
    location = str(root / "artifacts" / re.sub(r"[^\w.-]", "_", name)) if root else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def metric_name(*parts: str) -> str:
    """Parts joined by "/", each with the characters MLflow refuses replaced by "_"."""
    return "/".join(_INVALID_NAME.sub("_", p) for p in parts)


def registered_name(name: str) -> str:
    """A valid registered model name ("/" and ":" are refused): ``org/model`` -> ``org--model``."""
    return name.replace("/", "--").replace(":", "-")


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"models": [{"parameters": {"weight": 1}}]}`` -> ``{"models.0.parameters.weight": "1"}``."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value if isinstance(value, str) else json.dumps(value)}
    flat: dict[str, str] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def source_aliases(sources: list[Source]) -> dict[str, str]:
    """Source key -> the short name used in metric names: the repo id, else the folder name; unique."""
    aliases: dict[str, str] = {}
    for s in sources:
        alias = s.repo_id or Path(s.key).name or s.key
        if alias in aliases.values():
            alias = f"{alias}_{len(aliases)}"
        aliases[s.key] = alias
    return aliases


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    """The lineage as MLflow tags (the same on the run and on the registered version)."""
    tags = {
        f"{TAG}method": lineage.method,
        f"{TAG}recipe_sha256": lineage.recipe_sha256,
        f"{TAG}output_hash": lineage.output_hash,
        f"{TAG}sources": str(len(lineage.sources)),
    }
    optional = {
        "base_model": lineage.base_model, "dvc_hash": lineage.dvc_hash, "dvc_stage": lineage.dvc_stage,
        "git_commit": lineage.git_commit, "git_dirty": None if lineage.git_dirty is None else str(lineage.git_dirty).lower(),
        "prefect.flow_run_id": lineage.prefect_flow_run_id, "prefect.root_flow_run_id": lineage.prefect_root_flow_run_id,
    }
    tags.update({f"{TAG}{k}": v for k, v in optional.items() if v is not None})
    for i, s in enumerate(lineage.sources):
        tags.update({f"{TAG}source.{i}.{k}": v for k, v in _source_fields(s).items() if v is not None})
        tags[f"{TAG}source.{i}.role"] = "base" if s.is_base else "source"
        if s.adapter:
            tags.update({f"{TAG}source.{i}.adapter.{k}": v for k, v in _source_fields(s.adapter).items() if v is not None})
    return tags


SOURCE_FIELDS = ("key", "repo_id", "revision", "commit", "path")
"""The tags of one source (and of its adapter, under ``adapter.``)."""


def _source_fields(s: Source) -> dict[str, str | None]:
    return dict(zip(SOURCE_FIELDS, (s.key, s.repo_id, s.revision, s.commit_sha, str(s.path) if s.path else None), strict=True))


def _source_from_tags(tag: Callable[[str], str | None], prefix: str) -> Source:
    key, repo_id, revision, commit, path = (tag(f"{prefix}{k}") for k in SOURCE_FIELDS)
    return Source(key=key or "?", repo_id=repo_id, revision=revision, commit_sha=commit, path=path)


def _metrics(merged: EvalResult, sources: dict[str, EvalResult], aliases: dict[str, str], stats: MergeStats, output_bytes: int) -> dict[str, float]:
    values: dict[str, float] = {}
    for role, result in [(("merged",), merged), *((("source", aliases.get(k, k)), r) for k, r in sources.items())]:
        for task_name, metrics in result.metrics.items():
            values.update({metric_name("eval", *role, task_name, *m.split("/")): v for m, v in metrics.items()})
    merge = {
        "seconds": stats.merge_seconds, "pipeline_seconds": stats.pipeline_seconds, "throughput_bytes_per_s": stats.throughput_bytes_per_s,
        "peak_rss_bytes": stats.peak_rss_bytes, "output_bytes": output_bytes,
    }
    values.update({f"merge/{k}": float(v) for k, v in merge.items() if v is not None})
    return values


def log_batches(mlflow: MlflowClient, run_id: str, *, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    for i in range(0, max(len(params), len(metrics), len(tags)), _BATCH):
        mlflow.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in list(metrics.items())[i : i + _BATCH]],
            params=[Param(k, v[:6000]) for k, v in list(params.items())[i : i + _BATCH]],
            tags=[RunTag(k, v[:8000]) for k, v in list(tags.items())[i : i + _BATCH]],
        )


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def track_run(
    *,
    merged_dir: Path,
    recipe: Recipe,
    lineage: Lineage,
    merged: EvalResult,
    sources: dict[str, EvalResult],
    evaluation: EvalSettings,
    gate: GatePolicy,
    model_name: str,
    stats: MergeStats | None = None,
    chart: Path | None = None,
    compatibility: CompatibilityReport | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> TrackedRun:
    """Create the MLflow run of a merged model and register it as a new version of ``model_name``.

    The run stays open (RUNNING) until ``record_outcome`` adds the gate decision and the Hub commit.

    Args:
        merged_dir: the merged folder; its card and config are logged, its weights are not (see ``model/model_ref.json``).
        recipe: the recipe as loaded (its fields as params, its text as an artifact).
        lineage: from ``mergeflow.lineage.collect_lineage`` and ``finish_lineage``.
        merged, sources: evaluations of the merged model and of each source (by recipe key, the base included).
        evaluation, gate: the settings used (params ``eval.*``, ``gate.*``).
        model_name: the registered model ("/" becomes "--").
        stats: merge wall time, throughput, peak RSS.
        chart: PNG of merged vs sources; compatibility: the pipeline's compatibility report.
        tracking_uri: default ``resolve_tracking_uri()``; experiment: default MLFLOW_EXPERIMENT_NAME or "mergeflow".

    Raises:
        TrackingError: MLflow refused a request (4xx).
    """
    uri = resolve_tracking_uri(tracking_uri)
    stats = stats or MergeStats()
    aliases = source_aliases(lineage.sources)
    name = registered_name(model_name)
    mlflow = client(uri)
    with refusals(uri):
        exp = experiment_id(mlflow, uri, experiment)
        tags = {**lineage_tags(lineage), "mlflow.runName": Path(merged_dir).name, f"{TAG}outcome": "evaluated"}
        run = mlflow.create_run(exp, run_name=Path(merged_dir).name, tags={"mlflow.runName": Path(merged_dir).name})
        run_id = run.info.run_id
        try:
            params = flatten(recipe.model_dump(mode="json", exclude_unset=True))
            params.update(flatten(evaluation.model_dump(mode="json"), "eval"))
            params.update(flatten(gate.model_dump(mode="json"), "gate"))
            if stats.plan_sha256:
                params["plan_sha256"] = stats.plan_sha256
            metrics = _metrics(merged, sources, aliases, stats, lineage.output_bytes)
            log_batches(mlflow, run_id, params=params, metrics=metrics, tags=tags)
            _log_artifacts(mlflow, run_id, merged_dir=merged_dir, recipe=recipe, lineage=lineage, merged=merged,
                           sources=sources, aliases=aliases, chart=chart, compatibility=compatibility)
            version = _register(mlflow, name, run_id=run_id, source=f"{run.info.artifact_uri}/model", tags=lineage_tags(lineage))
        except BaseException:
            mlflow.set_terminated(run_id, "FAILED")
            raise
    return TrackedRun(run_id=run_id, experiment_id=exp, tracking_uri=uri, model_name=name, model_version=version,
                      artifact_uri=run.info.artifact_uri)


def _log_artifacts(
    mlflow: MlflowClient, run_id: str, *, merged_dir: Path, recipe: Recipe, lineage: Lineage, merged: EvalResult,
    sources: dict[str, EvalResult], aliases: dict[str, str], chart: Path | None, compatibility: CompatibilityReport | None,
) -> None:
    with tempfile.TemporaryDirectory(prefix="mergeflow-mlflow-") as tmp:
        staging = Path(tmp)
        _write(staging, f"recipe/{recipe.file_name}", recipe.text)
        model = staging / "model"
        model.mkdir()
        for name in ("README.md", "config.json"):
            if (Path(merged_dir) / name).is_file():
                shutil.copyfile(Path(merged_dir) / name, model / name)
        files = {p.relative_to(merged_dir).as_posix(): p.stat().st_size for p in sorted(Path(merged_dir).rglob("*")) if p.is_file()}
        ref = {"path": str(Path(merged_dir).resolve()), "content_hash": lineage.output_hash, "files": files}
        _write(model, "model_ref.json", json.dumps(ref, indent=2) + "\n")
        shutil.copyfile(merged.raw_path, _write(staging, "eval/merged.json", ""))
        for key, result in sources.items():
            shutil.copyfile(result.raw_path, _write(staging, f"eval/sources/{metric_name(aliases.get(key, key)).replace('/', '--')}.json", ""))
        summary = {"merged": merged.model_dump(mode="json"), "sources": {k: r.model_dump(mode="json") for k, r in sources.items()}}
        _write(staging, "eval/summary.json", json.dumps(summary, indent=2) + "\n")
        _write(staging, "lineage.json", lineage.model_dump_json(indent=2) + "\n")
        if compatibility is not None:
            _write(staging, "compatibility/report.json", compatibility.model_dump_json(indent=2) + "\n")
            _write(staging, "compatibility/report.md", compatibility.markdown())
        if chart is not None:
            shutil.copyfile(chart, _write(staging, "charts/scores.png", ""))
        mlflow.log_artifacts(run_id, str(staging))


def _register(mlflow: MlflowClient, name: str, *, run_id: str, source: str, tags: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_registered_model(name, description="Merged models tracked by mergeflow; each version's tags hold its lineage.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                          description=f"{tags.get(f'{TAG}method')} merge, output {tags.get(f'{TAG}output_hash', '')[:12]}")
    return str(version.version)


def record_outcome(run: TrackedRun, *, decision: GateDecision, outcome: Outcome, published: Published | None = None) -> None:
    """Add the gate decision and the Hub commit to the run and its registered version, then end the run.

    ``outcome``: from ``mergeflow.gate.outcome``, or ``publish_failed``.
    """
    tags = {f"{TAG}gate": "passed" if decision.passed else "failed", f"{TAG}outcome": outcome}
    if decision.reasons:
        tags[f"{TAG}gate.reasons"] = "; ".join(decision.reasons)
    if published is not None:
        tags.update({f"{TAG}hub.repo_id": published.repo_id, f"{TAG}hub.commit": published.commit_sha, f"{TAG}hub.url": published.url})
    mlflow = client(run.tracking_uri)
    with refusals(run.tracking_uri):
        log_batches(mlflow, run.run_id, params={}, metrics={"gate/passed": float(decision.passed)}, tags=tags)
        mlflow.log_text(run.run_id, decision.model_dump_json(indent=2) + "\n", "gate.json")
        for key, value in tags.items():
            mlflow.set_model_version_tag(run.model_name, run.model_version, key, value[:5000])
        mlflow.set_terminated(run.run_id, "FINISHED")


def lineage(name: str, *, tracking_uri: str | None = None) -> LineageTree:
    """Every registered version of ``name`` with its sources, hashes, gate and Hub commit, newest first.

    Raises:
        TrackingError: no registered model of that name (or MLflow refused).
    """
    uri = resolve_tracking_uri(tracking_uri)
    mlflow = client(uri)
    with refusals(uri):
        model = mlflow.get_registered_model(registered_name(name))
        versions = mlflow.search_model_versions(f"name = '{model.name}'")
    found = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags: dict[str, str] = dict(v.tags)

        def tag(key: str, tags: dict[str, str] = tags) -> str | None:
            return tags.get(f"{TAG}{key}")

        records = []
        for i in range(int(tag("sources") or 0)):
            adapter = _source_from_tags(tag, f"source.{i}.adapter.") if tag(f"source.{i}.adapter.key") else None
            records.append(_source_from_tags(tag, f"source.{i}.").model_copy(update={"is_base": tag(f"source.{i}.role") == "base", "adapter": adapter}))
        found.append(VersionLineage(
            version=str(v.version), run_id=v.run_id, method=tag("method"), output_hash=tag("output_hash"),
            recipe_sha256=tag("recipe_sha256"), sources=records, gate=tag("gate"), gate_reasons=tag("gate.reasons"),
            outcome=tag("outcome"), hub_repo_id=tag("hub.repo_id"), hub_commit=tag("hub.commit"), hub_url=tag("hub.url"),
        ))
    return LineageTree(name=model.name, tracking_uri=uri, versions=found)
