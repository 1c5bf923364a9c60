"""The Hub card (merge conventions, evaluation, lineage) and publishing to a LocalHub with the real client."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from evaluate_publish_helpers import fake_eval, hub_lineage
from huggingface_hub import HfApi, ModelCard, snapshot_download
from pipeline_helpers import folder_bytes, hub_online
from prefect import flow

from merge_ops.engine import merge_model
from merge_ops.errors import MergeflowError
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from mergeflow import settings
from mergeflow.card import CARD_MARK, write_hub_card
from mergeflow.errors import PublishError
from mergeflow.hub import PublishTarget, publish_model
from mergeflow.local_hub import LocalHub
from mergeflow.sources import Source
from tasks.publish import publish_model_task

REPO_ID = "mergeflow/tiny-ties"


@pytest.fixture
def merged(family: dict[str, Path], tmp_path: Path) -> Path:
    """A ties merge of the tiny family, with the engine's card (local paths in its base_model)."""
    recipe = tmp_path / "recipe.yaml"
    models = [{"model": str(family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft_a", "ft_b")]
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(family["base"]), "models": models, "dtype": "float32"}))
    merge_model(plan_merge(load_recipe(recipe)), tmp_path / "merged")
    return tmp_path / "merged"


def front_matter(card: Path) -> dict:
    _, header, _ = card.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def write_card(folder: Path, tmp_path: Path, **lineage_overrides: object) -> Path:
    merged_eval = fake_eval(folder, {"skill_add": 0.6, "skill_reverse": 0.85}, tmp_path / "raw", name="merged")
    sources = {"mergeflow/ft_a@main": fake_eval(folder, {"skill_add": 0.8, "skill_reverse": 0.0}, tmp_path / "raw", name="ft_a")}
    lineage = hub_lineage().model_copy(update=lineage_overrides)
    return write_hub_card(folder, lineage=lineage, merged=merged_eval, sources=sources, model_name="tiny-ties")


def test_card_follows_the_hub_merge_conventions(merged: Path, tmp_path: Path) -> None:
    engine_card = (merged / "README.md").read_text()
    card = write_card(merged, tmp_path)
    meta = front_matter(card)
    assert meta["base_model"] == ["mergeflow/base", "mergeflow/ft_a", "mergeflow/ft_b"]
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "mergeflow", "ties"]
    (index,) = meta["model-index"]
    assert index["name"] == "tiny-ties"
    results = {r["dataset"]["name"]: (r["task"]["type"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in index["results"]}
    assert results == {"skill_add": ("text-generation", "exact_match", 0.6), "skill_reverse": ("text-generation", "exact_match", 0.85)}
    text = card.read_text()
    assert "merge_method: ties" in text and engine_card.split("---\n", 2)[2].strip() in text  # the engine's body and recipe
    assert "| task | metric | this model | `mergeflow/ft_a@bbbbbbbbbbbb` |" in text and "| skill_add | exact_match | **0.6000 ± 0.0100** | 0.8000 ± 0.0100 |" in text
    assert f"| base | `mergeflow/base` | main | `{'a' * 40}` |" in text
    assert f"| source | `mergeflow/ft_a` | main | `{'b' * 40}` |" in text
    assert f"content sha256 `{'f' * 64}`" in text and f"Recipe sha256 `{'d' * 64}`" in text
    assert "(documents per task limited to 40), ± its standard error as lm-eval computes it." in text
    assert ModelCard.load(card).data.base_model == meta["base_model"]


def test_card_is_regenerated_not_appended(merged: Path, tmp_path: Path) -> None:
    first = write_card(merged, tmp_path).read_text()
    assert write_card(merged, tmp_path).read_text() == first and first.count(CARD_MARK) == 1
    changed = write_card(merged, tmp_path, output_hash="0" * 64).read_text()
    assert changed.count(CARD_MARK) == 1 and "0" * 64 in changed and "f" * 64 not in changed


def test_local_sources_are_not_listed_as_hub_base_models(merged: Path, tmp_path: Path) -> None:
    local = [Source(key=str(merged.parent / n), path=str(merged.parent / n), is_base=n == "base") for n in ("base", "a")]
    meta = front_matter(write_card(merged, tmp_path, sources=local))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["merge", "mergeflow", "ties"] and meta["model-index"][0]["results"]


def test_publish_then_identical_content_makes_no_new_commit(merged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    write_card(merged, tmp_path)
    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setattr(settings, "HF_ENDPOINT", hub.endpoint)  # HF_ENDPOINT is the default endpoint
        api = HfApi(endpoint=hub.endpoint)
        first = publish_model(merged, repo_id=REPO_ID, private=True)
        assert first.new_commit and api.model_info(REPO_ID).sha == first.commit_sha and api.model_info(REPO_ID).private
        snapshot = snapshot_download(REPO_ID, revision=first.commit_sha, cache_dir=tmp_path / "dl", endpoint=hub.endpoint)
        assert folder_bytes(Path(snapshot)) == folder_bytes(merged)
        commits = len(api.list_repo_commits(REPO_ID))

        again = publish_model(merged, repo_id=REPO_ID, commit_message="same files again")
        assert (again.commit_sha, again.new_commit) == (first.commit_sha, False)
        assert len(api.list_repo_commits(REPO_ID)) == commits

        write_card(merged, tmp_path, output_hash="0" * 64)
        changed = publish_model(merged, repo_id=REPO_ID)
        assert changed.new_commit and changed.commit_sha != first.commit_sha
        assert len(api.list_repo_commits(REPO_ID)) == commits + 1


@pytest.mark.slow
def test_refusals_are_not_retried(prefect_api: str, merged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    attempts: list[int] = []
    real = HfApi.create_repo

    def counting(self: HfApi, *args: object, **kwargs: object) -> object:
        attempts.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", counting)

    @flow
    def publish_once(target: PublishTarget) -> None:
        publish_model_task(merged, target)

    with LocalHub(tmp_path / "hub", token="s3cret") as hub:  # no HF_TOKEN here: 401
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"cannot publish to 'mergeflow/tiny-ties' \(401\).*HF_TOKEN") as err:
            publish_once(PublishTarget(repo_id=REPO_ID, endpoint=hub.endpoint))
    assert isinstance(err.value, MergeflowError) and attempts == [1] and time.monotonic() - started < 30
