"""Five adapters' workflow end to end on the demo family's LoRA adapters, against a LocalHub: adapters pinned and
downloaded -> combined into one adapter (``output: adapter``) -> evaluated with lm-eval on the base -> tracked in
MLflow with each adapter's commit -> gated -> published with the Hub's adapter conventions."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from evaluate_publish_helpers import EVALS
from huggingface_hub import HfApi, ModelCard, snapshot_download
from mlflow import MlflowClient
from pipeline_helpers import folder_bytes, hub_online, push, write_recipe

from flows.merge_evaluate_publish import merge_evaluate_publish
from merge_ops.adapter_merge import merge_adapters, plan_adapter_merge
from merge_ops.recipe_file import parse_recipe
from mergeflow.evaluation import evaluate_model
from mergeflow.local_hub import LocalHub

pytest_plugins = ["demo_family_fixtures", "evaluate_publish_fixtures"]
pytestmark = pytest.mark.slow  # the demo adapters, Prefect, lm-eval, MLflow and a LocalHub

PUBLISHED = "mergeflow/skills-lora"
SKILLS = ("add", "reverse")


def params_file(folder: Path) -> Path:
    """Evaluation on the two skills (40 documents each) and a gate the merged adapter can pass."""
    params = {
        "eval": {"tasks": ["skill_add", "skill_reverse"], "include_path": str(EVALS), "limit": 40, "batch_size": 32, "dtype": "float32"},
        "gate": {"min_score": {}, "max_regression": None, "min_average_gain": None},
    }
    return write_recipe(folder / "params.yaml", params)


def test_adapters_from_a_hub_merge_into_a_published_adapter(
    prefect_api: str, mlflow_store: str, demo_family, demo_adapters, demo_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapters = {skill: demo_family.root / "adapters" / skill for skill in SKILLS}
    local = {"merge_method": "ties", "output": "adapter", "base_model": str(demo_family.models["base"]), "parameters": {"density": 0.5},
             "dtype": "float32", "models": [{"model": str(folder), "parameters": {"weight": 1.0}} for folder in adapters.values()]}
    expected = merge_adapters(plan_adapter_merge(parse_recipe(local)), tmp_path / "local")

    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        commits = {"base": push(api, "mergeflow/base", demo_family.models["base"])}
        commits |= {skill: push(api, f"mergeflow/lora-{skill}", folder) for skill, folder in adapters.items()}
        remote = {**local, "base_model": "mergeflow/base", "models": [{"model": f"mergeflow/lora-{s}", "parameters": {"weight": 1.0}} for s in SKILLS]}
        result = merge_evaluate_publish(
            recipe=write_recipe(tmp_path / "recipe.yaml", remote), out=tmp_path / "merged", publish_repo=PUBLISHED,
            params_file=params_file(tmp_path), endpoint=hub.endpoint,
        )
        published = result.evaluation.published
        assert result.evaluation.outcome == "published" and published is not None
        snapshot = Path(snapshot_download(PUBLISHED, revision=published.commit_sha, cache_dir=tmp_path / "again", endpoint=hub.endpoint))

    # The adapter merged from the Hub is the one merged from the local folders; published as it is, with an adapter card.
    assert result.merge.shards[0].sha256 == expected
    assert folder_bytes(snapshot) == folder_bytes(tmp_path / "merged")
    card = ModelCard.load(snapshot / "README.md")
    assert (card.data.library_name, card.data.base_model, card.data.base_model_relation) == ("peft", "mergeflow/base", "adapter")
    assert {"lora", "peft", "merge"} <= set(card.data.tags)
    for name, sha in commits.items():
        assert f"`{sha}`" in card.text, name

    # Evaluated with lm-eval on the base: the merged adapter and each adapter source, not the bare base.
    merged, sources = result.evaluation.merged, result.evaluation.sources
    base_scores = sources["mergeflow/base"].scores
    for skill in SKILLS:
        own = sources[f"mergeflow/lora-{skill}"].scores[f"skill_{skill}"]
        assert own > base_scores[f"skill_{skill}"] + 0.3, (skill, own, base_scores)
    direct = evaluate_model(tmp_path / "merged", base=demo_family.models["base"], tasks=["skill_add", "skill_reverse"], include_path=EVALS,
                            limit=40, batch_size=32, dtype="float32", cache_dir=tmp_path / "fresh_cache")
    assert merged.scores == direct.scores

    # MLflow: each adapter with its commit, under its source.
    run = MlflowClient(tracking_uri=mlflow_store).get_run(result.evaluation.run.run_id)
    tags = run.data.tags
    adapter_commits = {tags[f"mergeflow.source.{i}.adapter.repo_id"]: tags[f"mergeflow.source.{i}.adapter.commit"]
                       for i in range(int(tags["mergeflow.sources"])) if f"mergeflow.source.{i}.adapter.repo_id" in tags}
    assert adapter_commits == {f"mergeflow/lora-{s}": commits[s] for s in SKILLS}
    assert yaml.safe_load((tmp_path / "merged" / "adapter_config.json").read_text())["base_model_name_or_path"] == "mergeflow/base"
