"""evaluate_model: real lm-eval on the demo family's local tasks, the raw JSON, and the content-hash cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lm_eval
import pytest
from evaluate_publish_helpers import EVALS

from mergeflow.errors import EvaluationError
from mergeflow.evaluation import evaluate_model
from mergeflow.files import model_content_hash

# Plugins, not imports: imported fixtures would be one session fixture per module (one family build each).
pytest_plugins = ["demo_family_fixtures"]
pytestmark = pytest.mark.slow  # real lm-eval on the demo family

TASKS = ["skill_add", "skill_reverse"]
LIMIT = 20


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model folders lm-eval really evaluated (cache hits do not call it)."""
    seen: list[str] = []
    real = lm_eval.simple_evaluate

    def counting(*args: object, **kwargs: object) -> object:
        seen.append(str(kwargs["model_args"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    return seen


def evaluate(folder: Path, cache: Path, **overrides: object) -> object:
    settings = {"tasks": TASKS, "include_path": EVALS, "limit": LIMIT, "batch_size": 32, "dtype": "float32", **overrides}
    return evaluate_model(folder, cache_dir=cache, **settings)  # type: ignore[arg-type]


def test_scores_per_task_and_the_raw_results_json(demo_family, demo_env, tmp_path: Path, calls: list[str]) -> None:
    result = evaluate(demo_family.models["add"], tmp_path / "cache")
    assert result.scores["skill_add"] >= 0.6 and result.scores["skill_reverse"] <= 0.1
    assert result.primary == {"skill_add": "exact_match", "skill_reverse": "exact_match"}
    assert result.groups == [] and not result.cached and len(calls) == 1
    raw = json.loads(result.raw_path.read_text())
    assert raw["results"]["skill_add"]["exact_match,none"] == result.scores["skill_add"]
    assert raw["config"]["limit"] == LIMIT and raw["n-samples"]["skill_add"]["effective"] == LIMIT
    assert result.raw_path.parent == tmp_path / "cache" and result.content_hash == model_content_hash(demo_family.models["add"])


def test_same_content_evaluates_once_wherever_it_lives(demo_family, demo_env, tmp_path: Path, calls: list[str]) -> None:
    cache = tmp_path / "cache"
    first = evaluate(demo_family.models["add"], cache)
    copy = tmp_path / "downloaded" / "add"
    shutil.copytree(demo_family.models["add"], copy)
    (copy / "README.md").write_text("a different card does not change the model\n")
    again = evaluate(copy, cache)
    assert again.cached and again.model_dir == copy.resolve() and again.scores == first.scores
    assert again.cache_key == first.cache_key and len(calls) == 1

    other_limit = evaluate(copy, cache, limit=10)
    other_model = evaluate(demo_family.models["reverse"], cache)
    assert not other_limit.cached and not other_model.cached and len(calls) == 3
    assert len({first.cache_key, other_limit.cache_key, other_model.cache_key}) == 3
    assert other_model.scores["skill_reverse"] >= 0.9


def test_groups_are_reported_with_their_tasks(demo_family, demo_env, tmp_path: Path) -> None:
    result = evaluate(demo_family.models["reverse"], tmp_path / "cache", tasks=["skills_add_reverse"], limit=10)
    assert result.groups == ["skills_add_reverse"]
    assert set(result.scores) == {"skills_add_reverse", *TASKS} and set(result.task_scores) == set(TASKS)
    assert result.scores["skills_add_reverse"] == pytest.approx(sum(result.task_scores.values()) / 2)


def test_unknown_tasks_are_refused_before_loading_the_model(demo_family, tmp_path: Path, calls: list[str]) -> None:
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task\(s\) skill_mul .*eval.include_path"):
        evaluate(demo_family.models["add"], tmp_path / "cache", tasks=["skill_add", "skill_mul"])
    assert calls == []
    with pytest.raises(EvaluationError, match="holds no model files"):
        evaluate(tmp_path, tmp_path / "cache")
