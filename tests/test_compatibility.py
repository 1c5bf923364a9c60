"""The compatibility check: headers only (local and remote), every mismatch listed, weight-space base check."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from pipeline_helpers import hub_online, push, ties_recipe
from tiny_family import CONFIG, base_state, fine_tune, write_model

from merge_ops.compatibility import CompatibilityReport, compatibility_report
from merge_ops.errors import IncompatibleModelsError
from merge_ops.headers import ModelHeaders
from merge_ops.recipe_file import parse_recipe
from merge_ops.weight_space import weight_space_report
from mergeflow.local_hub import LocalHub
from mergeflow.sources import Source, read_source_headers, resolve_source


@pytest.fixture(scope="module")
def variants(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models that differ from the tiny family in one way each."""
    root = tmp_path_factory.mktemp("variants")
    base = base_state()
    wide = dict(CONFIG, hidden_size=32)
    vocab = dict(CONFIG, vocab_size=66)
    shallow = dict(CONFIG, num_hidden_layers=2)
    carded = write_model(root / "carded", fine_tune(base, 4))
    (carded / "README.md").write_text("---\nbase_model: org/other-base\n---\n# a fine-tune\n")
    return {
        "wide": write_model(root / "wide", fine_tune(base_state(config=wide), 5), config=wide),
        "vocab": write_model(root / "vocab", fine_tune(base_state(config=vocab), 6), config=vocab),
        "shallow": write_model(root / "shallow", fine_tune(base_state(config=shallow), 7), config=shallow),
        "bf16": write_model(root / "bf16", {k: v.to(torch.bfloat16) for k, v in fine_tune(base, 8).items()}),
        "unrelated": write_model(root / "unrelated", base_state(seed=7)),
        "carded": carded,
    }


def headers_of(recipe_data: dict, tmp_path: Path) -> tuple[object, dict[str, ModelHeaders]]:
    recipe = parse_recipe(recipe_data)
    sources = [resolve_source(ref, base_dir=tmp_path) for ref in recipe.referenced_models]
    return recipe, {s.key: read_source_headers(s) for s in sources}


def report_for(recipe_data: dict, tmp_path: Path) -> CompatibilityReport:
    recipe, headers = headers_of(recipe_data, tmp_path)
    return compatibility_report(recipe, headers)


def test_family_is_compatible(family: dict[str, Path], tmp_path: Path) -> None:
    report = report_for(ties_recipe(str(family["base"]), str(family["ft_a"]), str(family["ft_b"])), tmp_path)
    assert report.compatible and report.problems == []
    assert [m.layers for m in report.models] == [4, 4, 4]
    assert {f.check for f in report.findings} == {"declared_base"}  # notes only: no card declares a base
    assert "Compatibility: compatible" in report.markdown()


def test_every_mismatch_is_listed(family: dict[str, Path], variants: dict[str, Path], tmp_path: Path) -> None:
    report = report_for(ties_recipe(str(family["base"]), str(variants["wide"]), str(variants["vocab"])), tmp_path)
    by_model = {(f.model, f.check) for f in report.problems}
    assert (str(variants["wide"]), "config") in by_model  # hidden_size, stated on its own
    assert (str(variants["wide"]), "tensor_shapes") in by_model
    assert (str(variants["vocab"]), "vocabulary") in by_model
    # the vocabulary explains the embedding and lm_head rows: no separate shape mismatch for them
    assert (str(variants["vocab"]), "tensor_shapes") not in by_model
    vocab = next(f for f in report.problems if f.check == "vocabulary")
    assert "vocab_size is 66" in vocab.message and "+2 rows" in vocab.message and "lm_head.weight" in vocab.message
    hidden = next(f for f in report.problems if f.check == "config")
    assert "hidden_size is 32" in hidden.message
    with pytest.raises(IncompatibleModelsError) as err:
        report.raise_for_problems()
    assert len(err.value.mismatches) == len(report.problems) >= 3
    assert str(variants["wide"]) in str(err.value) and str(variants["vocab"]) in str(err.value)


def test_missing_tensors_and_depth(family: dict[str, Path], variants: dict[str, Path], tmp_path: Path) -> None:
    report = report_for(ties_recipe(str(family["base"]), str(family["ft_a"]), str(variants["shallow"])), tmp_path)
    names = next(f for f in report.problems if f.check == "tensor_names")
    assert names.model == str(variants["shallow"]) and "lacks 18 tensor(s)" in names.message


def test_passthrough_slices_of_different_depths(family: dict[str, Path], variants: dict[str, Path], tmp_path: Path) -> None:
    slices = [
        {"sources": [{"model": str(family["base"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(variants["shallow"]), "layer_range": [1, 2]}]},
    ]
    assert report_for({"merge_method": "passthrough", "slices": slices}, tmp_path).compatible
    slices[1]["sources"][0]["layer_range"] = [0, 3]
    report = report_for({"merge_method": "passthrough", "slices": slices}, tmp_path)
    assert [f.check for f in report.problems] == ["layers"]
    assert "asks for layers [0, 3) but the model has 2" in report.problems[0].message
    slices[1]["sources"][0].update(model=str(variants["wide"]), layer_range=[0, 1])
    report = report_for({"merge_method": "passthrough", "slices": slices}, tmp_path)
    assert {f.check for f in report.problems} == {"config", "tensor_shapes"}


def test_dtypes_and_declared_base(family: dict[str, Path], variants: dict[str, Path], tmp_path: Path) -> None:
    report = report_for(ties_recipe(str(family["base"]), str(variants["bf16"]), str(variants["carded"])), tmp_path)
    assert report.compatible
    dtypes = next(f for f in report.findings if f.check == "dtypes")
    assert dtypes.severity == "warning" and "BF16" in dtypes.message and "written as bfloat16" in dtypes.message
    carded = next(f for f in report.findings if f.model == str(variants["carded"]) and f.check == "declared_base")
    assert "org/other-base" in carded.message


def test_declared_base_against_a_hub_base(family: dict[str, Path], variants: dict[str, Path]) -> None:
    headers = {
        "org/base": ModelHeaders(key="org/base", config={}, tensors={}),
        "org/ft": ModelHeaders(key="org/ft", config={}, tensors={}, card_base_model=["org/base"]),
        "org/other": ModelHeaders(key="org/other", config={}, tensors={}, card_base_model=["org/other-base"]),
        "org/cfg": ModelHeaders(key="org/cfg", config={"_name_or_path": "org/base"}, tensors={}),
    }
    recipe = parse_recipe(dict(ties_recipe("org/base", "org/ft", "org/other"), models=[{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("org/ft", "org/other", "org/cfg")]))
    report = compatibility_report(recipe, headers)
    declared = {f.model: f.severity for f in report.findings if f.check == "declared_base"}
    assert declared == {"org/ft": "note", "org/other": "warning", "org/cfg": "note"}
    assert "as the recipe says" in next(f.message for f in report.findings if f.model == "org/cfg")


def test_weight_space_flags_an_unrelated_model(family: dict[str, Path], variants: dict[str, Path], tmp_path: Path) -> None:
    recipe_data = ties_recipe(str(family["base"]), str(family["ft_a"]), str(variants["unrelated"]))
    recipe, headers = headers_of(recipe_data, tmp_path)
    report = compatibility_report(recipe, headers)
    assert report.compatible  # same shapes: only the weights tell
    checked = weight_space_report(recipe, report, headers)
    distances = {d.model: d for d in checked.weight_space}
    assert distances[str(family["ft_a"])].fine_tuned and distances[str(family["ft_a"])].cosine > 0.5
    unrelated = distances[str(variants["unrelated"])]
    assert not unrelated.fine_tuned and abs(unrelated.cosine) < 0.2 and unrelated.tensors == 8
    warning = next(f for f in checked.findings if f.check == "weight_space")
    assert warning.model == str(variants["unrelated"]) and "not fine-tuned from this base" in warning.message
    assert "**no**" in checked.markdown()


def test_remote_headers_match_local_without_downloading_weights(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = hub_online(tmp_path, monkeypatch)
    folder = tmp_path / "carded_base"
    shutil.copytree(family["ft_a"], folder)
    (folder / "README.md").write_text("---\nbase_model: mergeflow/base\n---\n")
    with LocalHub(tmp_path / "hub") as hub:
        sha = push(HfApi(endpoint=hub.endpoint), "mergeflow/ft-a", folder)
        source = resolve_source(parse_recipe(ties_recipe("mergeflow/ft-a", "a/b", "c/d")).base_model, base_dir=tmp_path, endpoint=hub.endpoint)
        assert source == Source(key="mergeflow/ft-a", repo_id="mergeflow/ft-a", commit_sha=sha)
        remote = read_source_headers(source, endpoint=hub.endpoint)
    local = read_source_headers(Source(key="mergeflow/ft-a", path=folder))
    assert remote.path is None and remote.at(folder) == local and remote.card_base_model == ["mergeflow/base"]
    assert list(remote.tensors) == list(local.tensors)  # the same order, wherever the headers come from
    assert remote.config == json.loads((folder / "config.json").read_text())
    assert not list(home.rglob("*.safetensors")), "headers must come from ranged reads, not downloads"
