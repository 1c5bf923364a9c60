"""lm-eval on the local skill tasks in evals/: offline, from any working directory, with measured thresholds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from demo_family_fixtures import EVALS, REPO

from mergeflow.demo_family.build import FamilySettings
from mergeflow.demo_family.skills import SKILLS

# A plugin, not an import: imported fixtures would be one session fixture per module (two builds).
pytest_plugins = ["demo_family_fixtures"]
pytestmark = pytest.mark.slow  # lm-eval (library and CLI) on the demo family

# Measured on the default family (lm-eval exact match on the 200 held-out items of each skill):
# add 0.870, reverse 0.990, cipher 0.895; base at most 0.010; a fine-tune on another skill at most 0.010.
OWN_SKILL_MIN = {"add": 0.75, "reverse": 0.90, "cipher": 0.80}
OTHER_SKILL_MAX = 0.05
FINETUNES = list(FamilySettings().finetunes)
"""The skills with a full fine-tune; lower and spell have only LoRA adapters (test_demo_family.py checks those)."""


def _evaluate(model_dir: Path, tasks: list[str], *, limit: int | None = None) -> dict[str, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(EVALS), include_defaults=False),
        batch_size=32,
        bootstrap_iters=0,
        device="cpu",
        limit=limit,
        verbosity="ERROR",
    )
    return {name: float(metrics["exact_match,none"]) for name, metrics in results["results"].items()}


@pytest.fixture(scope="session")
def scores(demo_family, tmp_path_factory) -> dict[str, dict[str, float]]:
    """Every model of the family on every skill task, evaluated from a working directory outside the repo."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        tasks = [f"skill_{skill}" for skill in SKILLS]
        return {name: _evaluate(folder, tasks) for name, folder in demo_family.models.items()}


@pytest.mark.parametrize("skill", FINETUNES)
def test_each_fine_tune_is_high_on_its_own_skill(scores, skill):
    assert scores[skill][f"skill_{skill}"] >= OWN_SKILL_MIN[skill]


@pytest.mark.parametrize("skill", FINETUNES)
def test_each_fine_tune_is_low_on_the_other_skills(scores, skill):
    others = {task: value for task, value in scores[skill].items() if task != f"skill_{skill}"}
    assert all(value <= OTHER_SKILL_MAX for value in others.values()), others


def test_base_is_low_on_every_skill(scores):
    assert all(value <= OTHER_SKILL_MAX for value in scores["base"].values()), scores["base"]


def test_two_skill_group_is_the_mean_of_its_tasks(demo_family):
    result = _evaluate(demo_family.models["add"], ["skills_add_reverse"], limit=40)
    assert result["skills_add_reverse"] == pytest.approx((result["skill_add"] + result["skill_reverse"]) / 2)


def test_tasks_load_from_any_working_directory(demo_env, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(EVALS), include_defaults=False)
    tasks = manager.load([f"skill_{skill}" for skill in SKILLS])["tasks"]
    assert len(tasks) == len(SKILLS)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == 200, name
        assert set(docs[0]) == {"prompt", "answer"}


def test_lm_eval_cli_runs_the_local_tasks_offline(demo_family, demo_env, tmp_path):
    script = Path(sys.executable).parent / "lm_eval"  # the venv's console script, as documented
    lm_eval = str(script) if script.exists() else shutil.which("lm_eval")
    assert lm_eval, "lm_eval is not installed: pip install 'lm-eval[hf]'"
    command = [
        lm_eval,
        "--model", "hf",
        "--model_args", f"pretrained={demo_family.models['reverse']}",
        "--tasks", "skill_reverse",
        "--include_path", "evals",
        "--device", "cpu",
        "--limit", "20",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    run = subprocess.run(command, check=False, cwd=REPO, env=demo_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results_file.read_text())["results"]["skill_reverse"]["exact_match,none"] >= 0.9
