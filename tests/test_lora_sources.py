"""LoRA adapters as sources beyond ``mergeflow merge``: listed alone under the recipe's base, checked before any
weight is read, pinned and downloaded from a Hub, merged by the pipeline, and recorded in the lineage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from pipeline_helpers import folder_bytes, hub_online, push, write_recipe
from tiny_family import make_adapter

from merge_ops.adapter_merge import merge_adapters, plan_adapter_merge
from merge_ops.compatibility import compatibility_report
from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError, RecipeError
from merge_ops.plan import plan_merge, read_models
from merge_ops.recipe import ModelRef
from merge_ops.recipe_file import parse_recipe
from mergeflow.card import hub_card
from mergeflow.evaluation import EvalResult
from mergeflow.lineage import Lineage
from mergeflow.local_hub import LocalHub
from mergeflow.sources import Source, download_source, read_source_headers, resolve_source
from mergeflow.tracking import lineage_tags

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(family["base"], tmp_path_factory.mktemp("adapters") / "lora", 7, target_modules=TARGETS)


def ties(base: str, models: list[str], **extra: object) -> dict:
    return {"merge_method": "ties", "base_model": base, "dtype": "float32", **extra,
            "models": [{"model": m, "parameters": {"weight": 0.7, "density": 0.6}} for m in models]}


def merged(recipe: dict, out: Path) -> dict[str, bytes]:
    merge_model(plan_merge(parse_recipe(recipe)), out)
    return folder_bytes(out, suffix=".safetensors")


def test_an_adapter_listed_alone_is_applied_to_the_recipe_base(family: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    base = str(family["base"])
    alone = merged(ties(base, [str(adapter), str(family["ft_a"])]), tmp_path / "alone")
    plus = merged(ties(base, [f"{base}+{adapter}", str(family["ft_a"])]), tmp_path / "plus")
    assert alone == plus
    assert alone != merged(ties(base, [base, str(family["ft_a"])]), tmp_path / "without")


def test_adapter_outputs_take_adapters_listed_alone(family: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    base = str(family["base"])
    recipe = {"merge_method": "ties", "output": "adapter", "base_model": base, "parameters": {"density": 0.5}}
    alone = plan_adapter_merge(parse_recipe({**recipe, "models": [{"model": str(adapter), "parameters": {"weight": 0.7}}]}))
    plus = plan_adapter_merge(parse_recipe({**recipe, "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.7}}]}))
    assert merge_adapters(alone, tmp_path / "alone") == merge_adapters(plus, tmp_path / "plus")


def test_an_adapter_listed_alone_needs_a_base_model(family: dict[str, Path], adapter: Path) -> None:
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]})
    with pytest.raises(RecipeError, match="is a LoRA adapter; list it as BASE\\+"):
        plan_merge(recipe)


def test_the_report_shows_rank_alpha_and_the_base_the_adapter_was_trained_on(family: dict[str, Path], adapter: Path) -> None:
    recipe = parse_recipe(ties(str(family["base"]), [str(adapter)]))
    report = compatibility_report(recipe, read_models(recipe))
    assert report.compatible
    note = next(f for f in report.findings if f.check == "adapter_base")
    assert (note.severity, note.model) == ("note", str(adapter))
    assert "trained on it" in note.message and "r=4, lora_alpha=8, scale 2, 12 modules (down_proj, q_proj, v_proj)" in note.message
    assert "| `" + str(adapter) + "` | " + str(adapter) + ": r=4" in report.markdown()


def test_an_adapter_of_another_base_is_a_problem_unless_allowed(family: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    shutil.copytree(family["ft_a"], other)  # same shapes, other weights
    recipe = ties(str(other), [str(adapter)])
    with pytest.raises(IncompatibleModelsError, match=f"trained on {family['base']}, but is applied to {other}"):
        plan_merge(parse_recipe(recipe))
    allowed = parse_recipe({**recipe, "allow_adapter_base_mismatch": True})
    report = compatibility_report(allowed, read_models(allowed))
    assert report.compatible and [f.severity for f in report.findings if f.check == "adapter_base"] == ["warning"]


def test_modules_that_do_not_fit_are_reported_before_any_weight_is_read(family: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    renamed = {n.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.missing_proj"): t for n, t in tensors.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    recipe = parse_recipe(ties(str(family["base"]), [str(bad)]))
    report = compatibility_report(recipe, read_models(recipe))
    assert [f.message for f in report.problems] == [
        f"adapter {bad} does not fit {family['base']}: model.layers.0.self_attn.missing_proj: the base has no model.layers.0.self_attn.missing_proj.weight"
    ]


def test_adapters_are_pinned_read_and_downloaded_from_a_hub(family: dict[str, Path], adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        base_commit, adapter_commit = push(api, "org/base", family["base"]), push(api, "org/lora", adapter)
        plus = resolve_source(ModelRef.model_validate("org/base+org/lora"), base_dir=tmp_path, endpoint=hub.endpoint)
        alone = resolve_source(ModelRef.model_validate("org/lora"), base_dir=tmp_path, endpoint=hub.endpoint, base=ModelRef.model_validate("org/base"))
        for source, key in ((plus, "org/base+org/lora"), (alone, "org/lora")):
            assert (source.key, source.repo_id, source.commit_sha, source.path) == (key, "org/base", base_commit, None)
            assert source.adapter is not None and (source.adapter.repo_id, source.adapter.commit_sha) == ("org/lora", adapter_commit)
        assert plus.label == f"org/base@{base_commit[:12]}+org/lora@{adapter_commit[:12]}"

        remote = read_source_headers(plus, endpoint=hub.endpoint)  # ranged reads, no weights
        local = download_source(plus, endpoint=hub.endpoint)
        assert local.adapter is not None and local.adapter.path is not None and local.path is not None
        assert sorted(p.name for p in local.adapter.path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        on_disk = read_source_headers(local)
        assert remote.lora.keys() == on_disk.lora.keys() and len(remote.lora) == 12
        assert remote.tensors == on_disk.tensors and remote.adapter is not None and remote.adapter.tensors == on_disk.adapter.tensors  # type: ignore[union-attr]
        with pytest.raises(Exception, match="is not a PEFT LoRA adapter"):
            resolve_source(ModelRef.model_validate("org/base+org/base"), base_dir=tmp_path, endpoint=hub.endpoint)


def test_lineage_records_each_adapter_with_its_commit(tmp_path: Path) -> None:
    adapter = Source(key="org/lora", repo_id="org/lora", commit_sha="a" * 40)
    source = Source(key="org/base+org/lora", repo_id="org/base", commit_sha="b" * 40, adapter=adapter)
    lineage = Lineage(method="ties", recipe_sha256="r", base_model="org/base", output_hash="h",
                      sources=[Source(key="org/base", repo_id="org/base", commit_sha="b" * 40, is_base=True), source])
    tags = lineage_tags(lineage)
    assert (tags["mergeflow.source.1.adapter.repo_id"], tags["mergeflow.source.1.adapter.commit"]) == ("org/lora", "a" * 40)
    assert lineage.hub_base_models == ["org/base", "org/lora"]
    card = hub_card("# merged\n", lineage=lineage, merged=EvalResult(model_dir=tmp_path, content_hash="h", cache_key="k", tasks=[], metrics={}, primary={}, groups=[],
                                                                raw_path=tmp_path / "raw.json", lm_eval_version="0", seconds=0.0), model_name="m")
    assert f"| LoRA adapter on the row above | `org/lora` | main | `{'a' * 40}` |" in card
    assert source.pinned == f"org/base @ {'b' * 40} + adapter org/lora @ {'a' * 40}"
    adapter_card = hub_card("# merged\n", lineage=lineage, merged=EvalResult(model_dir=tmp_path, content_hash="h", cache_key="k", tasks=[], metrics={},
                            primary={}, groups=[], raw_path=tmp_path / "raw.json", lm_eval_version="0", seconds=0.0), model_name="m", adapter=True)
    meta = yaml.safe_load(adapter_card.split("---\n")[1])
    assert (meta["library_name"], meta["base_model"], meta["base_model_relation"]) == ("peft", "org/base", "adapter")
    assert {"lora", "peft", "merge"} <= set(meta["tags"])


@pytest.mark.slow
def test_the_pipeline_merges_adapters_from_a_hub_like_local_folders(
    prefect_api: str, family: dict[str, Path], adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.merge_pipeline import merge_pipeline

    hub_online(tmp_path, monkeypatch)
    local = merged(ties(str(family["base"]), [f"{family['base']}+{adapter}", str(adapter), str(family["ft_a"])]), tmp_path / "local")
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        commits = {name: push(api, f"org/{name}", folder) for name, folder in (("base", family["base"]), ("lora", adapter), ("ft_a", family["ft_a"]))}
        recipe = write_recipe(tmp_path / "recipe.yaml", ties("org/base", ["org/base+org/lora", "org/lora", "org/ft_a"]))
        summary = merge_pipeline(recipe=recipe, out=tmp_path / "merged", endpoint=hub.endpoint)
    assert folder_bytes(tmp_path / "merged", suffix=".safetensors") == local
    adapted = {s.key: s for s in summary.sources if s.adapter}
    assert sorted(adapted) == ["org/base+org/lora", "org/lora"]
    assert {s.adapter.commit_sha for s in adapted.values()} == {commits["lora"]}  # type: ignore[union-attr]
    assert summary.compatibility is not None and [f.check for f in summary.compatibility.findings].count("adapter_base") == 2


@pytest.mark.slow
def test_the_pipeline_merges_hub_adapters_into_an_adapter_without_the_base_weights(
    prefect_api: str, family: dict[str, Path], adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.merge_pipeline import merge_pipeline

    second = make_adapter(family["base"], tmp_path / "second", 8, target_modules=["q_proj", "o_proj"])
    recipe = {"merge_method": "dare_ties", "output": "adapter", "parameters": {"density": 0.5}, "seed": 3}
    local = {**recipe, "base_model": str(family["base"]), "models": [{"model": str(a), "parameters": {"weight": 0.8}} for a in (adapter, second)]}
    expected = merge_adapters(plan_adapter_merge(parse_recipe(local)), tmp_path / "local")
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        for name, folder in (("base", family["base"]), ("lora", adapter), ("second", second)):
            push(api, f"org/{name}", folder)
        remote = {**recipe, "base_model": "org/base",
                  "models": [{"model": "org/base+org/lora", "parameters": {"weight": 0.8}}, {"model": "org/second", "parameters": {"weight": 0.8}}]}
        summary = merge_pipeline(recipe=write_recipe(tmp_path / "recipe.yaml", remote), out=tmp_path / "merged", endpoint=hub.endpoint)
    assert summary.shards[0].sha256 == expected
    assert (tmp_path / "merged" / "adapter_model.safetensors").read_bytes() == (tmp_path / "local" / "adapter_model.safetensors").read_bytes()
    assert all(s.path is None for s in summary.sources)  # the base's weights were never downloaded
    assert [s.adapter.repo_id for s in summary.sources if s.adapter] == ["org/lora", "org/second"]  # type: ignore[union-attr]
    assert not list((tmp_path / "hf_home").rglob("model.safetensors"))
