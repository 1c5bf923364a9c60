"""MLflow tracking against a real SQLite store in tmp: the local store layout, run contents, registry, lineage."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from evaluate_publish_helpers import fake_eval, hub_lineage
from mlflow import MlflowClient
from typer.testing import CliRunner

from merge_ops.compatibility import CompatibilityReport, Finding
from merge_ops.engine import merge_model
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from mergeflow import settings
from mergeflow.chart import plot_scores
from mergeflow.cli import app
from mergeflow.errors import TrackingError
from mergeflow.evaluation import EvalSettings
from mergeflow.gate import GateDecision, GatePolicy
from mergeflow.hub import Published
from mergeflow.tracking import MergeStats, flatten, lineage, metric_name, record_outcome, resolve_tracking_uri, track_run

pytest_plugins = ["evaluate_publish_fixtures"]  # a plugin: the template database is made once per session

REPO = Path(__file__).resolve().parents[1]
SCORES = {"merged": {"skill_add": 0.6, "skill_reverse": 0.85}, "ft_a": {"skill_add": 0.8, "skill_reverse": 0.0},
          "ft_b": {"skill_add": 0.0, "skill_reverse": 0.95}, "base": {"skill_add": 0.0, "skill_reverse": 0.0}}


@pytest.fixture
def merged(family: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(recipe, merged folder): a ties merge of the tiny family, with the engine's card."""
    recipe = tmp_path / "recipe.yaml"
    models = [{"model": str(family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft_a", "ft_b")]
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(family["base"]), "models": models, "dtype": "float32"}))
    plan = plan_merge(load_recipe(recipe))
    merge_model(plan, tmp_path / "merged")
    return recipe, tmp_path / "merged"


def track(recipe: Path, folder: Path, tmp_path: Path, **overrides: object):
    lineage_ = hub_lineage()
    evals = {name: fake_eval(folder, scores, tmp_path / "raw", name=name) for name, scores in SCORES.items()}
    sources = {"mergeflow/ft_a@main": evals["ft_a"], "mergeflow/ft_b": evals["ft_b"], "mergeflow/base": evals["base"]}
    chart = plot_scores(evals["merged"].scores, {k: v.scores for k, v in sources.items()}, tmp_path / "chart.png")
    report = CompatibilityReport(method="ties", reference="mergeflow/base", models=[],
                                 findings=[Finding(severity="note", model=None, check="dtype", message="all float32")])
    arguments = dict(
        merged_dir=folder, recipe=load_recipe(recipe), lineage=lineage_, merged=evals["merged"], sources=sources,
        evaluation=EvalSettings(tasks=["skill_add", "skill_reverse"], limit=40), gate=GatePolicy(), model_name="mergeflow/tiny-ties",
        stats=MergeStats(merge_seconds=1.5, throughput_bytes_per_s=2e6, peak_rss_bytes=300_000_000, plan_sha256="9" * 64),
        chart=chart, compatibility=report,
    )
    return track_run(**{**arguments, **overrides})


def artifact_files(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path or None):
        found |= artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


@pytest.mark.slow
def test_the_local_store_is_one_folder(mlflow_store: str, merged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_tracking_uri() == mlflow_store
    run = track(*merged, tmp_path)
    assert run.tracking_uri == mlflow_store
    assert Path(run.artifact_uri).is_relative_to(tmp_path / "mlruns" / "artifacts")
    assert list(elsewhere.iterdir()) == [], "nothing may land in the working directory (no ./mlflow.db, no ./mlruns)"
    stored = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    assert not [p for p in stored if p.suffix == ".safetensors"], "the weights are never copied into the store"


@pytest.mark.slow
def test_the_run_holds_params_metrics_lineage_and_artifacts(mlflow_store: str, merged, tmp_path: Path) -> None:
    run = track(*merged, tmp_path)
    client = MlflowClient(tracking_uri=mlflow_store)
    data = client.get_run(run.run_id).data
    assert data.params["merge_method"] == "ties" and data.params["models.1.parameters.density"] == "0.5"
    assert data.params["eval.limit"] == "40" and data.params["gate.max_regression"] == "0.02" and data.params["plan_sha256"] == "9" * 64
    assert data.params["eval.bootstrap_iters"] == "1000" and data.params["gate.stderr_margin"] == "2.0"
    assert data.metrics["eval/merged/skill_add/exact_match"] == 0.6
    assert data.metrics["eval/merged/skill_add/exact_match_stderr"] == 0.01
    assert data.metrics["eval/source/mergeflow/ft_b/skill_reverse/exact_match"] == 0.95
    assert data.metrics["eval/source/mergeflow/ft_b/skill_reverse/exact_match_stderr"] == 0.01
    assert data.metrics["eval/source/mergeflow/base/skill_add/exact_match"] == 0.0
    assert data.metrics["merge/seconds"] == 1.5 and data.metrics["merge/peak_rss_bytes"] == 300_000_000
    assert data.metrics["merge/throughput_bytes_per_s"] == 2e6 and data.metrics["merge/output_bytes"] == 1234
    tags = data.tags
    assert tags["mergeflow.source.0.repo_id"] == "mergeflow/base" and tags["mergeflow.source.0.role"] == "base"
    assert tags["mergeflow.source.1.revision"] == "main" and tags["mergeflow.source.1.commit"] == "b" * 40
    assert tags["mergeflow.output_hash"] == "f" * 64 and tags["mergeflow.recipe_sha256"] == "d" * 64
    assert tags["mergeflow.git_commit"] == "e" * 40 and tags["mergeflow.base_model"] == "mergeflow/base"
    assert artifact_files(client, run.run_id) == {
        "recipe/recipe.yaml", "model/README.md", "model/config.json", "model/model_ref.json", "eval/merged.json",
        "eval/sources/mergeflow--ft_a.json", "eval/sources/mergeflow--ft_b.json", "eval/sources/mergeflow--base.json",
        "eval/summary.json", "lineage.json", "compatibility/report.json", "compatibility/report.md", "charts/scores.png",
    }
    assert client.get_run(run.run_id).info.status == "RUNNING", "open until the outcome is recorded"


@pytest.mark.slow
def test_registered_version_carries_lineage_and_the_hub_commit(mlflow_store: str, merged, tmp_path: Path) -> None:
    first = track(*merged, tmp_path)
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    version = client.get_model_version("mergeflow--tiny-ties", first.model_version)
    assert version.run_id == first.run_id and version.source == f"{first.artifact_uri}/model"
    assert version.tags["mergeflow.source.2.repo_id"] == "mergeflow/ft_b" and version.tags["mergeflow.method"] == "ties"

    published = Published(repo_id="mergeflow/tiny-ties", commit_sha="1" * 40, new_commit=True, url="http://hub/mergeflow/tiny-ties")
    record_outcome(first, decision=GateDecision(passed=True, reasons=[], checks=[]), outcome="published", published=published)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(first.run_id).data.tags["mergeflow.hub.commit"] == "1" * 40
    assert client.get_model_version("mergeflow--tiny-ties", first.model_version).tags["mergeflow.hub.commit"] == "1" * 40

    second = track(*merged, tmp_path)
    record_outcome(second, decision=GateDecision(passed=False, reasons=["skill_add: too low"], checks=[]), outcome="gate_failed")
    tree = lineage("mergeflow/tiny-ties")
    assert [v.version for v in tree.versions] == [second.model_version, first.model_version] == ["2", "1"]
    newest, oldest = tree.versions
    assert (newest.gate, newest.gate_reasons, newest.outcome, newest.hub_commit) == ("failed", "skill_add: too low", "gate_failed", None)
    assert oldest.hub_commit == "1" * 40 and oldest.outcome == "published"
    assert [(s.repo_id, s.commit_sha, s.is_base) for s in oldest.sources] == [
        ("mergeflow/base", "a" * 40, True), ("mergeflow/ft_a", "b" * 40, False), ("mergeflow/ft_b", "c" * 40, False),
    ]
    data = client.get_run(second.run_id).data
    assert data.metrics["gate/passed"] == 0.0 and data.tags["mergeflow.gate"] == "failed"

    result = CliRunner().invoke(app, ["lineage", "mergeflow/tiny-ties"])
    assert result.exit_code == 0, result.output
    for text in ("version 2", "version 1", "mergeflow/ft_a @ " + "b" * 40, "published  mergeflow/tiny-ties @ " + "1" * 40,
                 "failed: skill_add: too low", "content sha256 " + "f" * 64):
        assert text in result.output


@pytest.mark.slow
def test_mlflow_tracking_uri_overrides_the_local_store(mlflow_store: str, mlflow_template: Path, merged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    team = tmp_path / "team" / "mlflow.db"
    team.parent.mkdir()
    team.write_bytes(mlflow_template.read_bytes())
    monkeypatch.setattr(settings, "MLFLOW_TRACKING_URI", f"sqlite:///{team}")
    run = track(*merged, tmp_path)
    assert run.tracking_uri == f"sqlite:///{team}"
    assert MlflowClient(tracking_uri=f"sqlite:///{team}").get_run(run.run_id).data.tags["mergeflow.method"] == "ties"
    assert not MlflowClient(tracking_uri=mlflow_store).search_registered_models()


@pytest.mark.slow
def test_unknown_model_is_one_clear_error(mlflow_store: str) -> None:
    with pytest.raises(TrackingError, match="refused the request.*MLFLOW_TRACKING_URI"):
        lineage("nobody")
    result = CliRunner().invoke(app, ["lineage", "nobody"])
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output


def test_flatten_and_metric_names() -> None:
    recipe = {"merge_method": "ties", "models": [{"model": "a", "parameters": {"density": [{"filter": "mlp", "value": 0.5}]}}], "seed": None}
    assert flatten(recipe) == {"merge_method": "ties", "models.0.model": "a", "models.0.parameters.density.0.filter": "mlp",
                               "models.0.parameters.density.0.value": "0.5", "seed": "null"}
    assert metric_name("eval", "source", "org/model@v1", "gsm8k", "exact_match,strict") == "eval/source/org/model_v1/gsm8k/exact_match_strict"


@pytest.mark.slow
def test_lineage_has_hashes_git_and_the_dvc_hash_under_dvc(merged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from mergeflow.files import model_content_hash
    from mergeflow.lineage import collect_lineage, finish_lineage
    from mergeflow.sources import Source

    recipe, folder = merged
    sources = [Source(key="ft_a", path=folder.parent / "ft_a")]
    monkeypatch.chdir(REPO)
    plain = finish_lineage(collect_lineage(recipe=load_recipe(recipe), sources=sources, output_hash=model_content_hash(folder)), folder)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert plain.git_commit == head and plain.dvc_hash is None and plain.prefect_flow_run_id is None
    assert plain.method == "ties" and plain.output_bytes == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert plain.recipe_sha256 == plan_merge(load_recipe(recipe)).recipe_sha256

    monkeypatch.setattr(settings, "DVC_STAGE", "merge")
    under_dvc = finish_lineage(collect_lineage(recipe=load_recipe(recipe), sources=sources, output_hash=plain.output_hash), folder)
    project = tmp_path / "dvc_project"
    shutil.copytree(folder, project / "model")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "add", "-q", "model"], cwd=project, check=True)
    assert under_dvc.dvc_hash == yaml.safe_load((project / "model.dvc").read_text())["outs"][0]["md5"]
    assert under_dvc.dvc_stage == "merge" and under_dvc.dvc_hash.endswith(".dir")
