"""End to end on the demo skills family against a LocalHub: download -> merge -> evaluate -> track -> gate -> publish.

The sources are uploaded to the LocalHub and downloaded from it with snapshot_download; the merge is
``merge_ops.engine.merge_model`` (the lead switches this to the full merge pipeline), then the
``evaluate_track_publish`` flow runs under the session's Prefect test harness with a real MLflow store.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from evaluate_publish_helpers import EVALS, REPO
from huggingface_hub import HfApi, ModelCard, snapshot_download
from mlflow import MlflowClient
from pipeline_helpers import folder_bytes, hub_online, push
from typer.testing import CliRunner

from flows.evaluate_publish import evaluate_track_publish
from merge_ops.engine import merge_model
from merge_ops.headers import read_local_headers
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from mergeflow.cli import app
from mergeflow.errors import GateFailedError
from mergeflow.evaluation import EvalSettings
from mergeflow.gate import GatePolicy
from mergeflow.hub import PublishTarget
from mergeflow.local_hub import LocalHub
from mergeflow.sources import Source

# Plugins, not imports: imported fixtures would be one session fixture per module (one family build each).
pytest_plugins = ["demo_family_fixtures", "evaluate_publish_fixtures"]
pytestmark = pytest.mark.slow  # the Prefect flow with lm-eval, MLflow and a LocalHub on the demo family

EVALUATION = EvalSettings(tasks=["skill_add", "skill_reverse"], include_path=EVALS, limit=40, batch_size=32, dtype="float32")
PUBLISHED = "mergeflow/skills-ta"


@pytest.fixture
def merged_from_hub(demo_family, demo_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Sources pushed to a LocalHub, downloaded back, merged (task arithmetic of add and reverse over the base)."""
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        commits = {name: push(api, f"mergeflow/{name}", demo_family.models[name]) for name in ("base", "add", "reverse")}
        keys = {"base": "mergeflow/base", "add": "mergeflow/add@main", "reverse": "mergeflow/reverse"}
        sources = []
        for name, key in keys.items():
            folder = snapshot_download(f"mergeflow/{name}", revision=commits[name], cache_dir=tmp_path / "hf_cache", endpoint=hub.endpoint)
            sources.append(Source(key=key, repo_id=f"mergeflow/{name}", revision="main" if "@" in key else None,
                                          commit_sha=commits[name], path=Path(folder)))
        recipe = tmp_path / "skills-ta.yaml"
        models = [{"model": keys[n], "parameters": {"weight": 1.0}} for n in ("add", "reverse")]
        recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": keys["base"], "models": models,
                                          "parameters": {"lambda": 1.0}, "dtype": "float32"}, sort_keys=False))
        plan = plan_merge(load_recipe(recipe), {s.key: read_local_headers(s.key, s.path) for s in sources})
        merge_model(plan, tmp_path / "merged" / "skills-ta")
        yield hub, api, recipe, sources, tmp_path / "merged" / "skills-ta", commits


def run_flow(merged_from_hub, tmp_path: Path, **overrides: object):
    hub, _, recipe, sources, merged, _ = merged_from_hub
    arguments = dict(
        merged_dir=merged, recipe=load_recipe(recipe), sources=sources, evaluation=EVALUATION,
        # the repository's default policy, without the standard-error margin: 40 items per task are too few for it
        gate=GatePolicy.from_params(REPO / "params.yaml").model_copy(update={"stderr_margin": 0.0}),
        publish=PublishTarget(repo_id=PUBLISHED, endpoint=hub.endpoint), eval_cache_dir=tmp_path / "eval_cache",
    )
    return evaluate_track_publish(**{**arguments, **overrides})


def test_passing_gate_publishes_and_tracks_lineage(prefect_api: str, mlflow_store: str, merged_from_hub, tmp_path: Path) -> None:
    hub, api, _, _, merged, commits = merged_from_hub
    result = run_flow(merged_from_hub, tmp_path)
    assert result.outcome == "published" and result.gate.passed, result.gate.reasons
    # The merge combines the skills: on each task near its best source, on average above both.
    scores = result.merged.scores
    assert scores["skill_add"] >= 0.3 and scores["skill_reverse"] >= 0.6
    assert result.sources["mergeflow/add@main"].scores["skill_add"] >= 0.6

    # The published repo, downloaded again, is the merged folder byte for byte; its card follows the conventions.
    published = result.published
    assert published is not None and published.new_commit and api.model_info(PUBLISHED).sha == published.commit_sha
    snapshot = Path(snapshot_download(PUBLISHED, revision=published.commit_sha, cache_dir=tmp_path / "again", endpoint=hub.endpoint))
    assert folder_bytes(snapshot) == folder_bytes(merged) and len(folder_bytes(merged)) >= 6
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == ["mergeflow/base", "mergeflow/add", "mergeflow/reverse"]
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergeflow", "task_arithmetic"]
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == pytest.approx(scores)
    for name, sha in commits.items():
        assert f"| `mergeflow/{name}` |" in card.text and f"`{sha}`" in card.text
    assert "merge_method: task_arithmetic" in card.text and result.lineage.output_hash in card.text

    # MLflow: the run (metrics, lineage, Hub commit) and the registered version.
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    run = client.get_run(result.run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/merged/skill_add/exact_match"] == scores["skill_add"]
    assert run.data.metrics["eval/source/mergeflow/reverse/skill_reverse/exact_match"] >= 0.9
    assert run.data.metrics["merge/output_bytes"] > 0 and run.data.metrics["gate/passed"] == 1.0
    assert run.data.tags["mergeflow.hub.commit"] == published.commit_sha and run.data.tags["mergeflow.outcome"] == "published"
    assert run.data.tags["mergeflow.source.1.commit"] == commits["add"] and run.data.tags["mergeflow.base_model"] == "mergeflow/base"
    assert run.data.tags["mergeflow.prefect.flow_run_id"] and run.data.params["merge_method"] == "task_arithmetic"
    version = client.get_model_version("skills-ta", result.run.model_version)
    assert version.tags["mergeflow.output_hash"] == result.lineage.output_hash == run.data.tags["mergeflow.output_hash"]
    assert version.tags["mergeflow.hub.commit"] == published.commit_sha

    # Again with the same inputs: every evaluation comes from the cache, and the Hub gets no new commit.
    commits_before = len(api.list_repo_commits(PUBLISHED))
    again = run_flow(merged_from_hub, tmp_path)
    assert again.merged.cached and all(r.cached for r in again.sources.values())
    assert again.published is not None and (again.published.commit_sha, again.published.new_commit) == (published.commit_sha, False)
    assert len(api.list_repo_commits(PUBLISHED)) == commits_before

    output = CliRunner().invoke(app, ["lineage", "skills-ta"]).output
    assert "version 2" in output and "version 1" in output
    assert f"mergeflow/add @ {commits['add']}" in output and f"published  {PUBLISHED} @ {published.commit_sha}" in output


def test_failing_gate_publishes_nothing(prefect_api: str, mlflow_store: str, merged_from_hub, tmp_path: Path) -> None:
    hub, api, *_ = merged_from_hub
    strict = GatePolicy(max_regression=0.05, min_average_gain=0.0)
    with pytest.raises(GateFailedError, match=r"skills-ta did not pass the gate .*skill_add: .* regresses") as failed:
        run_flow(merged_from_hub, tmp_path, gate=strict, publish=PublishTarget(repo_id="mergeflow/skills-ta-strict", endpoint=hub.endpoint))
    assert not api.repo_exists("mergeflow/skills-ta-strict") and not api.repo_exists(PUBLISHED)

    client = MlflowClient(tracking_uri=mlflow_store)
    run = client.get_run(failed.value.run_id)
    assert run.data.tags["mergeflow.gate"] == "failed" and run.data.tags["mergeflow.outcome"] == "gate_failed"
    assert "skill_add" in run.data.tags["mergeflow.gate.reasons"] and "mergeflow.hub.commit" not in run.data.tags
    assert run.data.metrics["gate/passed"] == 0.0
    gate_json = client.download_artifacts(run.info.run_id, "gate.json", str(tmp_path))
    assert '"passed": false' in Path(gate_json).read_text()

    kept = run_flow(merged_from_hub, tmp_path, gate=strict, publish=None, fail_on_gate=False)
    assert (kept.outcome, kept.published, kept.gate.passed) == ("gate_failed", None, False) and kept.merged.cached
