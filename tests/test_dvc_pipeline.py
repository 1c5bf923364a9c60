"""dvc.yaml with real git and dvc: two fresh copies reproduce the same hashes, a parameter reruns only its
stages, ``dvc exp run -S`` runs a variant, ``dvc push``/``dvc pull`` restore the outputs.

Each project copy starts from the session's demo family and its adapters (the family stage keeps a folder already
holding them), and evaluates 40 items per task to keep the test short.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, constants

from mergeflow.demo_family.build import FamilySummary
from mergeflow.local_hub import LocalHub

pytest_plugins = ["demo_family_fixtures"]
pytestmark = pytest.mark.slow  # dvc repro of the whole project twice, on the demo family
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("family", "resolve", "merge", "evaluate", "publish")


def project_copy(dest: Path, family: FamilySummary) -> Path:
    """The project's files (tracked and new, not ignored) in a fresh git repository, with the family in place."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True, text=True)
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file() and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["eval"]["limit"] = 40
    params["gate"]["stderr_margin"] = 0.0  # 40 items per task: the default 2-standard-error margin is wider than the gain
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(family.root, dest / "outputs" / "demo-family")
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=dest, check=True)
    return dest


def dvc_env(prefect_api: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MERGEFLOW_", "HF_", "DVC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_API_URL=prefect_api, HF_HOME=str(home),
        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GIT_AUTHOR_NAME="mergeflow tests", GIT_AUTHOR_EMAIL="tests@mergeflow.invalid",  # dvc exp commits
        GIT_COMMITTER_NAME="mergeflow tests", GIT_COMMITTER_EMAIL="tests@mergeflow.invalid",
    )
    return env


def dvc(project: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reproduced(
    tmp_path_factory: pytest.TempPathFactory, demo_family: FamilySummary, demo_adapters: FamilySummary, prefect_api: str
) -> dict[str, tuple[Path, dict[str, str]]]:
    """Two fresh copies of the project, each reproduced with `dvc repro` at the same time (family and adapters built)."""
    copies = {}
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"dvc_{name}")
        copies[name] = (project_copy(root / "project", demo_family), dvc_env(prefect_api, root / "hf_home"))
    runs = {name: subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=p, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, (p, e) in copies.items()}
    for name, process in runs.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"dvc repro in copy {name} failed:\n{output[-6000:]}"
        assert ran(output) == set(STAGES)
    return copies


def test_two_fresh_copies_reproduce_the_same_lock(reproduced) -> None:
    (a, env_a), (b, _) = reproduced["a"], reproduced["b"]
    lock_a, lock_b = (a / "dvc.lock").read_text(), (b / "dvc.lock").read_text()
    assert lock_a == lock_b
    outs = {o["path"]: o["md5"] for stage in yaml.safe_load(lock_a)["stages"].values() for o in stage.get("outs", [])}
    assert {"outputs/merged", "outputs/release", "metrics/eval.json", "metrics/publish.json"} <= set(outs)
    assert digests(a / "outputs" / "merged") == digests(b / "outputs" / "merged")

    # the merge of the two skills beats each source on their mean, passed the gate and was published
    metrics = json.loads((a / "metrics" / "eval.json").read_text())
    assert metrics["mean"] > metrics["best_source_mean"]
    outcome = json.loads((a / "metrics" / "publish.json").read_text())
    assert outcome["outcome"] == "published" and outcome["repo_id"] == "demo/skills-merged" and len(outcome["commit_sha"]) == 40
    # the sources were pinned to Hub commits; nothing is left to run
    sources = json.loads((a / "outputs" / "sources.json").read_text())["sources"]
    assert {s["repo_id"] for s in sources} == {"demo/base", "demo/add", "demo/reverse"}
    assert all(len(s["commit_sha"]) == 40 and not Path(s["path"]).is_absolute() for s in sources)
    assert json.loads(dvc(a, env_a, "status", "--json")) == {"resolve": ["always changed"]}
    pins = json.loads((a / "outputs" / "pins.json").read_text())["sources"]
    assert {(p["repo_id"], p["commit_sha"]) for p in pins} == {(s["repo_id"], s["commit_sha"]) for s in sources}


def test_a_parameter_reruns_only_the_stages_that_read_it(reproduced) -> None:
    project, env = reproduced["b"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"]["min_average_gain"] = 0.06
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(dvc(project, env, "repro")) == {"resolve", "publish"}


def test_exp_run_with_set_param_runs_a_variant(reproduced) -> None:
    project, env = reproduced["a"]
    output = dvc(project, env, "exp", "run", "-n", "ties-half", "-S", "merge.method=ties", "-S", "+merge.parameters.density=0.5", "-S", "publish.repo=null")
    assert ran(output) == {"resolve", "merge", "evaluate", "publish"}
    recipe = yaml.safe_load((project / "outputs" / "recipe.yaml").read_text())
    assert recipe["merge_method"] == "ties" and recipe["parameters"]["density"] == 0.5

    shown = json.loads(dvc(project, env, "exp", "show", "--json"))
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    variant = next(e for e in experiments if e["name"] == "ties-half")
    data = variant["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["merge"]["method"] == "ties"
    eval_metrics = data["metrics"]["metrics/eval.json"]["data"]
    assert 0.0 <= eval_metrics["mean"] <= 1.0
    assert data["metrics"]["metrics/publish.json"]["data"]["outcome"] in ("gate_failed", "not_published")
    assert json.loads((project / "metrics" / "publish.json").read_text())["commit_sha"] is None  # publish.repo=null


def test_push_then_pull_restores_the_outputs(reproduced) -> None:
    project, env = reproduced["b"]
    merged, release = project / "outputs" / "merged", project / "outputs" / "release"
    before = {"merged": digests(merged), "release": digests(release)}
    dvc(project, env, "push")
    assert any((project / "dvc-remote").rglob("*"))
    shutil.rmtree(merged)
    shutil.rmtree(release)
    shutil.rmtree(project / ".dvc" / "cache")
    dvc(project, env, "pull")
    assert {"merged": digests(merged), "release": digests(release)} == before


def test_repro_re_merges_exactly_when_a_source_moves_upstream(reproduced, monkeypatch: pytest.MonkeyPatch) -> None:
    project, env = reproduced["b"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # this process pushes to the local Hub (conftest sets offline mode)
    assert ran(dvc(project, env, "repro")) == {"resolve"}  # the sources did not move: nothing is merged again
    pins_before = {p["repo_id"]: p["commit_sha"] for p in json.loads((project / "outputs" / "pins.json").read_text())["sources"]}
    with LocalHub(project / "outputs" / "hub") as hub:  # a new commit on demo/add, as its author would push upstream
        HfApi(endpoint=hub.endpoint).upload_file(path_or_fileobj=b"evaluation notes", path_in_repo="NOTES.md", repo_id="demo/add")
    output = dvc(project, env, "repro")
    assert {"resolve", "merge"} <= ran(output)
    pins_after = {p["repo_id"]: p["commit_sha"] for p in json.loads((project / "outputs" / "pins.json").read_text())["sources"]}
    assert pins_after["demo/add"] != pins_before["demo/add"] and pins_after["demo/base"] == pins_before["demo/base"]
    merged = {s["repo_id"]: s["commit_sha"] for s in json.loads((project / "outputs" / "sources.json").read_text())["sources"]}
    assert merged == pins_after
