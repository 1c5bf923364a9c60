"""evaluate_model: real lm-eval on the demo family's local tasks and LoRA adapters, standard errors, the raw JSON, the
content-hash cache, and local tasks mixed with lm-eval's registered ones."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from evaluate_publish_helpers import EVALS
from huggingface_hub import HfApi
from peft import PeftModel
from pipeline_helpers import hub_online
from transformers import LlamaForCausalLM

from mergeflow.errors import EvaluationError
from mergeflow.evaluation import evaluate_model
from mergeflow.files import model_content_hash
from mergeflow.local_hub import LocalHub

# Plugins, not imports: imported fixtures would be one session fixture per module (one family build each).
pytest_plugins = ["demo_family_fixtures"]

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


@pytest.mark.slow  # real lm-eval on the demo family
def test_scores_per_task_and_the_raw_results_json(demo_family, demo_env, tmp_path: Path, calls: list[str]) -> None:
    result = evaluate(demo_family.models["add"], tmp_path / "cache")
    assert result.scores["skill_add"] >= 0.6 and result.scores["skill_reverse"] <= 0.1
    assert result.primary == {"skill_add": "exact_match", "skill_reverse": "exact_match"}
    assert result.groups == [] and not result.cached and len(calls) == 1
    raw = json.loads(result.raw_path.read_text())
    assert raw["results"]["skill_add"]["exact_match,none"] == result.scores["skill_add"]
    assert raw["config"]["limit"] == LIMIT and raw["n-samples"]["skill_add"]["effective"] == LIMIT
    assert result.raw_path.parent == tmp_path / "cache" and result.content_hash == model_content_hash(demo_family.models["add"])
    # exact match is a mean: lm-eval's closed-form standard error, the sample standard deviation over sqrt(n)
    p = result.scores["skill_add"]
    assert result.stderrs["skill_add"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))
    assert raw["results"]["skill_add"]["exact_match_stderr,none"] == result.metrics["skill_add"]["exact_match_stderr"]
    assert raw["config"]["bootstrap_iters"] == 1000


@pytest.mark.slow  # real lm-eval on the demo family
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

    no_stderr = evaluate(copy, cache, bootstrap_iters=0)
    assert not no_stderr.cached and no_stderr.scores == first.scores and no_stderr.stderrs == {} and first.stderrs


@pytest.mark.slow  # real lm-eval on the demo family
def test_groups_are_reported_with_their_tasks(demo_family, demo_env, tmp_path: Path) -> None:
    result = evaluate(demo_family.models["reverse"], tmp_path / "cache", tasks=["skills_add_reverse"], limit=10)
    assert result.groups == ["skills_add_reverse"]
    assert set(result.scores) == {"skills_add_reverse", *TASKS} and set(result.task_scores) == set(TASKS)
    assert result.scores["skills_add_reverse"] == pytest.approx(sum(result.task_scores.values()) / 2)


@pytest.mark.slow  # real lm-eval on the demo family
def test_unknown_tasks_are_refused_before_loading_the_model(demo_family, tmp_path: Path, calls: list[str]) -> None:
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task\(s\) skill_mul .*eval.include_path"):
        evaluate(demo_family.models["add"], tmp_path / "cache", tasks=["skill_add", "skill_mul"])
    assert calls == []
    with pytest.raises(EvaluationError, match="holds no model files"):
        evaluate(tmp_path, tmp_path / "cache")


@pytest.mark.slow
def test_an_adapter_is_evaluated_on_its_base_as_peft_applies_it(demo_family, demo_adapters, demo_env, tmp_path: Path, calls: list[str]) -> None:
    base, adapter = demo_family.models["base"], demo_adapters.models["add"]
    result = evaluate(adapter, tmp_path / "cache", base=base)
    assert calls == [f"pretrained={base.resolve()},peft={adapter.resolve()},dtype=float32"]
    assert result.scores["skill_add"] >= 0.8 and result.scores["skill_reverse"] <= 0.1 and result.content_hash == model_content_hash(adapter)

    merged = tmp_path / "add-merged-by-peft"  # the same adapter folded into the base by PEFT, evaluated as a full model
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload().save_pretrained(merged)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / file, merged / file)
    assert evaluate(merged, tmp_path / "cache").scores == result.scores

    assert evaluate(adapter, tmp_path / "cache", base=base).cached and len(calls) == 2
    other_base = evaluate(adapter, tmp_path / "cache", base=demo_family.models["reverse"])
    assert not other_base.cached and other_base.cache_key != result.cache_key and len(calls) == 3


def test_an_adapter_needs_its_base_and_a_full_model_none(tmp_path: Path, calls: list[str]) -> None:
    adapter, model = tmp_path / "adapter", tmp_path / "model"
    adapter.mkdir()
    model.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "../../base"}))
    (model / "config.json").write_text("{}")
    with pytest.raises(EvaluationError, match=r"is a PEFT adapter \(its config names the base '../../base'\): pass the folder of its base"):
        evaluate(adapter, tmp_path / "cache")
    with pytest.raises(EvaluationError, match="is not a PEFT adapter folder .*evaluate it without a base"):
        evaluate(model, tmp_path / "cache", base=adapter)
    assert calls == []


MIXED = """
import json, sys
from pathlib import Path
from mergeflow.evaluation import evaluate_model
model, evals, cache = map(Path, sys.argv[1:])
result = evaluate_model(model, tasks=["skill_add", "arithmetic_1dc"], include_path=evals, limit=6, batch_size=32, dtype="float32", cache_dir=cache)
print(json.dumps({"metrics": result.metrics, "primary": result.primary}))
"""


@pytest.mark.slow  # indexes lm-eval's ~15k registered tasks (~30 s), then real lm-eval
def test_local_and_registered_tasks_in_one_evaluation(demo_family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # arithmetic_1dc is lm-eval's own task, unchanged: it reads hf://datasets/EleutherAI/arithmetic/data/...jsonl,
    # served here by the local Hub (offline) with six questions of that file's format.
    rows = [{"context": f"Question: What is {a} + {b}?\nAnswer:", "completion": f" {a + b}"} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (4, 4), (0, 3)]]
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("EleutherAI/arithmetic", repo_type="dataset")
        api.upload_file(path_or_fileobj="".join(json.dumps(r) + "\n" for r in rows).encode(), path_in_repo="data/single_digit_three_ops.jsonl",
                        repo_id="EleutherAI/arithmetic", repo_type="dataset")
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", MIXED, str(demo_family.models["add"]), str(EVALS), str(tmp_path / "cache")],
                              env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["primary"] == {"skill_add": "exact_match", "arithmetic_1dc": "acc"}
    assert set(result["metrics"]["arithmetic_1dc"]) == {"acc", "acc_stderr"} and 0.0 <= result["metrics"]["arithmetic_1dc"]["acc"] <= 1.0
    assert result["metrics"]["skill_add"]["exact_match"] >= 0.5
