"""`mergeflow sweep`: the grid (pure), then the flow end to end on the demo family.

The flow test runs the real Prefect engine, a real MLflow store, lm-eval on the offline skills (20 documents
per task) and a LocalHub; the rerun through the CLI, with a stricter gate, checks the gate's refusal and that
the candidates come out byte for byte the same.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml
from evaluate_publish_helpers import EVALS, REPO
from huggingface_hub import HfApi, snapshot_download
from mlflow import MlflowClient
from pipeline_helpers import folder_bytes, hub_online
from typer.testing import CliRunner

from flows.runners import make_task_runner
from flows.sweep import sweep
from merge_ops.errors import RecipeError
from merge_ops.sweep_grid import expand_grid, parse_grid
from mergeflow import settings
from mergeflow.cli import app
from mergeflow.evaluation import EvalSettings
from mergeflow.local_hub import LocalHub

pytest_plugins = ["demo_family_fixtures", "evaluate_publish_fixtures"]

RECIPE = REPO / "recipes" / "skills-ties.yaml"
EVALUATION = EvalSettings(tasks=["skill_add", "skill_reverse"], include_path=EVALS, limit=20, batch_size=32, dtype="float32")
GRID = ["method=ties,task_arithmetic", "density=0.5,0.9"]
BEST_REPO = "mergeflow/skills-best"


def ties_recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


# -- the grid ---------------------------------------------------------------------------------------


def test_parse_grid_reads_yaml_scalars_in_order() -> None:
    grid = parse_grid(["method=ties, dare_ties", "density=0.3,0.5", "normalize=true,false", "lambda=1,1e-3"])
    assert list(grid) == ["method", "density", "normalize", "lambda"]
    assert grid == {"method": ["ties", "dare_ties"], "density": [0.3, 0.5], "normalize": [True, False], "lambda": [1, 0.001]}


def test_expand_grid_leaves_out_parameters_a_method_lacks_and_dedupes() -> None:
    grid = parse_grid(["method=ties,dare_ties,task_arithmetic", "density=0.3,0.5,0.7"])
    candidates = expand_grid(ties_recipe(), grid)
    assert [c.name for c in candidates] == [
        "ties-density_0.3", "ties-density_0.5", "ties-density_0.7",
        "dare_ties-density_0.3", "dare_ties-density_0.5", "dare_ties-density_0.7", "task_arithmetic",
    ]
    ties = candidates[1]
    assert (ties.method, ties.parameters) == ("ties", {"density": 0.5})
    assert ties.variant.data["parameters"] == {"lambda": 1.2, "density": 0.5}  # set globally, per-model values gone
    assert all("density" not in m["parameters"] for m in ties.variant.data["models"])
    arithmetic = candidates[-1]
    assert (arithmetic.parameters, arithmetic.variant.dropped, arithmetic.variant.recipe.merge_method) == ({}, ["density"], "task_arithmetic")


def test_candidates_follow_the_order_of_the_grid() -> None:
    names = [c.name for c in expand_grid(ties_recipe(), parse_grid(["density=0.5,0.9", "method=ties,task_arithmetic"]))]
    assert names == ["ties-density_0.5", "task_arithmetic", "ties-density_0.9"]
    assert [c.name for c in expand_grid(ties_recipe(), parse_grid(["lambda=1.0", "normalize=false"]))] == ["ties-lambda_1.0-normalize_false"]
    assert [c.name for c in expand_grid(ties_recipe(), {})] == ["ties"]  # no grid: the recipe itself


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["density"], "'density': write KEY=V1,V2"),
        (["density="], "density=: empty value"),
        (["density=0.3,,0.5"], "density=0.3,,0.5: empty value"),
        (["density=0.3", "density=0.5"], "density: given twice"),
        (["method=ties,nope"], "method=nope: not a known method"),
        (["method=task_arithmetic", "density=0.3"], "density=0.3: no candidate method has this parameter (task_arithmetic: weight, lambda"),
        (["density=0.5,1.5"], "ties-density_1.5: parameters.density: 1.5 is not allowed"),
    ],
)
def test_grid_errors_name_the_key_and_value(options: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        expand_grid(ties_recipe(), parse_grid(options))


def test_an_empty_value_list_is_refused() -> None:
    with pytest.raises(RecipeError, match=re.escape("density: no values")):
        expand_grid(ties_recipe(), {"density": []})


def test_cli_refuses_a_bad_grid_or_an_existing_folder_before_running(tmp_path: Path) -> None:
    bad = CliRunner().invoke(app, ["sweep", str(RECIPE), "--grid", "gamma=0.1"])
    assert bad.exit_code == 1 and "gamma=0.1: no candidate method has this parameter" in bad.output
    existing = CliRunner().invoke(app, ["sweep", str(RECIPE), "--grid", "density=0.5", "--out", str(tmp_path)])
    assert existing.exit_code == 1 and "pass --force" in existing.output


# -- the flow, end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_ranks_tracks_and_publishes_the_best(
    prefect_api: str, mlflow_store: str, demo_family, demo_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_online(tmp_path, monkeypatch)
    monkeypatch.setattr(settings, "EVAL_CACHE_DIR", tmp_path / "eval-cache")
    monkeypatch.chdir(tmp_path)  # the recipe's demo-family/NAME paths
    (tmp_path / "demo-family").symlink_to(demo_family.root)
    recipe = Path(shutil.copyfile(RECIPE, tmp_path / RECIPE.name))
    out = tmp_path / "sweeps" / "skills-ties"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["gate"]["stderr_margin"] = 0.0  # 20 items per task: the default 2-standard-error margin is wider than any gain
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        result = sweep.with_options(task_runner=make_task_runner(workers=2))(
            recipe=recipe, grid=parse_grid(GRID), out=out, publish_repo=BEST_REPO, endpoint=hub.endpoint,
            evaluation=EVALUATION, params_file=tmp_path / "params.yaml",
        )

        # Three candidates (task_arithmetic once), ranked by mean task score, ties broken by name
        candidates = result.candidates
        assert sorted(c.name for c in candidates) == ["task_arithmetic", "ties-density_0.5", "ties-density_0.9"]
        assert [c.rank for c in candidates] == [1, 2, 3]
        assert [(c.mean, c.name) for c in candidates] == sorted(((c.mean, c.name) for c in candidates), key=lambda p: (-p[0], p[1]))
        for c in candidates:
            assert c.mean == pytest.approx(sum(c.scores.values()) / 2) and set(c.scores) == {"skill_add", "skill_reverse"}
            assert (out / "recipes" / f"{c.name}.yaml").is_file() and (c.folder / "config.json").is_file()
        assert result.best.mean > max(sum(s.values()) / 2 for s in result.references.values())  # the merge beats every source

        # MLflow: a parent run with the grid and the ranking, a child run per candidate with its scores
        client = MlflowClient(tracking_uri=mlflow_store)
        parent = client.get_run(result.parent_run_id)
        assert parent.info.status == "FINISHED" and parent.data.params["grid.method"] == "ties,task_arithmetic"
        assert parent.data.params["grid.density"] == "0.5,0.9" and parent.data.params["merge_method"] == "ties"
        assert parent.data.tags["mergeflow.sweep.best"] == result.best.name and parent.data.tags["mergeflow.sweep.best_run_id"] == result.best.run_id
        assert parent.data.tags["mergeflow.sweep.ranking"].startswith(f"1. {result.best.name} ")
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
        assert {r.info.run_id for r in children} == {c.run_id for c in candidates}
        for c in candidates:
            child = client.get_run(str(c.run_id))
            assert child.data.metrics["eval/skill_add"] == c.scores["skill_add"] and child.data.metrics["eval/mean"] == pytest.approx(c.mean)
            assert child.data.metrics["rank"] == c.rank and child.data.params["merge_method"] == c.method
            assert child.data.params.get("density") == (str(c.parameters["density"]) if c.method == "ties" else None)

        # The best went through the gate (params.yaml's) and was published byte for byte; the parent says so
        publish = result.publish
        assert publish is not None and publish.outcome == "published" and publish.published is not None
        snapshot = snapshot_download(BEST_REPO, revision=publish.published.commit_sha, cache_dir=tmp_path / "check", endpoint=hub.endpoint)
        assert folder_bytes(Path(snapshot)) == folder_bytes(result.best.folder)
        assert client.get_run(result.parent_run_id).data.tags["mergeflow.hub.commit"] == publish.published.commit_sha
        first = {c.name: folder_bytes(c.folder) for c in candidates}

        # Again through the CLI with a gate the best cannot pass: nothing is published, the candidates are byte-identical
        strict = tmp_path / "strict-params.yaml"
        strict.write_text(yaml.safe_dump({"eval": EVALUATION.model_dump(mode="json"), "gate": {"min_score": {"skill_add": 0.99}}}))
        commits = api.list_repo_commits(BEST_REPO)
        arguments = ["sweep", str(recipe), *(a for g in GRID for a in ("--grid", g)), "--out", str(out), "--workers", "2",
                     "--publish", BEST_REPO, "--endpoint", hub.endpoint, "--params", str(strict), "--force"]
        rerun = CliRunner().invoke(app, arguments, env={"COLUMNS": "200"})
        assert rerun.exit_code == 0, rerun.output
        assert api.list_repo_commits(BEST_REPO) == commits
    row = rf"1[\s│]+{re.escape(result.best.name)}[\s│]+[\d.]+[\s│]+[\d.]+[\s│]+{result.best.mean:.3f}[\s│]+\w{{32}}"
    assert re.search(row, rerun.output), rerun.output
    assert "gate failed, not published: skill_add:" in rerun.output and "mlflow ui --backend-store-uri sqlite:///" in rerun.output
    assert {c.name: folder_bytes(c.folder) for c in candidates} == first  # the best's Hub card included
    for c in candidates:
        assert {f: hashlib.sha256((c.folder / f).read_bytes()).hexdigest() for f in c.shards} == c.shards
