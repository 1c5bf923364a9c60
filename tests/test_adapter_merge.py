"""Adapter-space merges (``output: adapter``): equal to PEFT's ``add_weighted_adapter`` on the same adapters."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_family import CONFIG, make_adapter
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from merge_ops.adapter_combination import COMBINATIONS, CombinationOptions, combine, dare_mask, seed_for
from merge_ops.adapter_merge import AdapterInput, merge_adapters, plan_adapter_merge, plan_adapters
from merge_ops.errors import IncompatibleModelsError, ModelNotFoundError, RecipeError
from merge_ops.recipe_file import parse_recipe
from mergeflow.cli import app

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], alpha_pattern={"v_proj": 2}),  # down_proj: only b
    "c": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),  # the embedding: only c
    "wide": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
SAME_RANK, MIXED_RANKS = ["a", "b", "c"], ["a", "wide", "b"]
WEIGHTS = [1.0, 0.8, -0.5]
SEED = 3


@pytest.fixture(scope="module")
def adapters(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(family["base"], root / name, seed, **options) for seed, (name, options) in enumerate(ADAPTERS.items(), 10)}


def recipe(family: dict[str, Path], adapters: dict[str, Path], names: list[str], method: str, **parameters: object) -> dict:
    return {"merge_method": method, "output": "adapter", "base_model": str(family["base"]), "seed": SEED, "parameters": parameters,
            "models": [{"model": f"{family['base']}+{adapters[n]}", "parameters": {"weight": w}} for n, w in zip(names, WEIGHTS, strict=True)]}


def options_for(method: str) -> dict:
    """Parameters for every combination type: density where required, the other sign method, an svd rank and clamp."""
    kind = COMBINATIONS[method]
    options: dict = {"density": 0.6} if kind.sparsify else {}
    options |= {"majority_sign_method": "frequency"} if kind.sign_election else {}
    options |= {"svd_rank": 6} if method == "dare_ties_svd" else {}
    options |= {"svd_clamp": 0.95} if method == "ties_svd" else {}
    return options


def peft_model(family: dict[str, Path], adapters: dict[str, Path], names: list[str]) -> peft.PeftModel:
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model


def lora_layers(model: peft.PeftModel) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            yield name.removeprefix("base_model.model."), module


def factors(layer: torch.nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


@pytest.fixture
def our_dare_masks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """PEFT's random pruning drawing our masks: each tensor PEFT prunes is looked up among the model's factors and updates."""
    known: list[tuple[torch.Tensor, int, bool]] = []

    def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        seed, transposed = next((s, t) for k, s, t in known if k.shape == tensor.shape and torch.equal(k, tensor))
        mask = dare_mask(tensor.T.shape if transposed else tensor.shape, density, seed)
        return tensor * (mask.T if transposed else mask) / density

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    registry: list = []

    def register(model: peft.PeftModel, names: list[str]) -> None:
        for module, layer in lora_layers(model):
            present = [n for n in names if factors(layer, n) is not None]
            for i, name in enumerate(present):
                a, b = factors(layer, name)  # type: ignore[misc]
                known.append((a.data, seed_for(SEED, f"{module}.lora_A.{i}"), False))
                known.append((b.data, seed_for(SEED, f"{module}.lora_B.{i}"), False))
                transposed = name in layer.lora_embedding_A
                known.append((layer.get_delta_weight(name), seed_for(SEED, f"{module}.delta.{i}"), transposed))

    registry.append(register)
    yield registry


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("method", list(COMBINATIONS))
def test_every_combination_type_equals_peft(method: str, family: dict[str, Path], adapters: dict[str, Path], our_dare_masks, tmp_path: Path) -> None:
    names = MIXED_RANKS if COMBINATIONS[method].space != "factors" else SAME_RANK
    options = options_for(method)
    out = tmp_path / "merged"
    plan = plan_adapter_merge(parse_recipe(recipe(family, adapters, names, method, **options)))
    merge_adapters(plan, out)

    reference = peft_model(family, adapters, names)
    our_dare_masks[0](reference, names)
    reference.add_weighted_adapter(names, WEIGHTS, "merged", combination_type=method, **options)
    ours = load_file(out / "adapter_model.safetensors")
    assert {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in ours} == {m for m, layer in lora_layers(reference) if "merged" in layer.r}
    for module, layer in lora_layers(reference):
        want_a, want_b = factors(layer, "merged")  # type: ignore[misc]
        suffix = ("lora_embedding_A", "lora_embedding_B") if "merged" in layer.lora_embedding_A else ("lora_A.weight", "lora_B.weight")
        got_a, got_b = (ours[f"base_model.model.{module}.{s}"] for s in suffix)
        if COMBINATIONS[method].space == "svd":  # factors are defined up to sign: compare the update they make
            torch.testing.assert_close(got_b @ got_a, want_b.detach() @ want_a.detach(), rtol=1e-4, atol=1e-6, msg=module)
        else:
            torch.testing.assert_close(got_a, want_a.detach(), rtol=1e-6, atol=0, msg=module)
            torch.testing.assert_close(got_b, want_b.detach(), rtol=1e-6, atol=0, msg=module)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == reference.peft_config["merged"].r and config["lora_alpha"] == config["r"]
    assert config["base_model_name_or_path"] == str(family["base"])
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), out)
    reference.set_adapter("merged")
    got, want = merged_weights(loaded), merged_weights(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(got[n], w) for n, w in load_file(family["base"] / "model.safetensors").items()), "the merge must change the base"


def test_two_runs_write_the_same_bytes(family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_adapter_merge(parse_recipe(recipe(family, adapters, SAME_RANK, "dare_ties", density=0.5)))
    digests = [merge_adapters(plan, tmp_path / f"run{i}") for i in range(2)]
    assert digests[0] == digests[1]
    assert all((tmp_path / "run0" / f).read_bytes() == (tmp_path / "run1" / f).read_bytes() for f in ("adapter_model.safetensors", "adapter_config.json"))
    other = plan_adapter_merge(parse_recipe({**recipe(family, adapters, SAME_RANK, "dare_ties", density=0.5), "seed": SEED + 1}))
    assert merge_adapters(other, tmp_path / "other-seed") != digests[0]


def test_cat_is_exact_and_rank_patterns_keep_the_output_loadable(family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    """cat: B @ A is the weighted sum of the updates; a linear merge of adapters whose rank_pattern lowers a module's rank
    gets rank_pattern entries (PEFT's own output would not load)."""
    patterned = make_adapter(family["base"], tmp_path / "patterned", 30, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    other = make_adapter(family["base"], tmp_path / "other", 31, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    inputs = [AdapterInput(key="p", folder=patterned, weight=0.5), AdapterInput(key="o", folder=other, weight=2.0)]
    merge_adapters(plan_adapters(inputs, combination="linear", base_model=str(family["base"])), tmp_path / "linear")
    config = json.loads((tmp_path / "linear" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2} and len(config["rank_pattern"]) == 4 and config["alpha_pattern"] == config["rank_pattern"]
    peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), tmp_path / "linear")

    merge_adapters(plan_adapters(inputs, combination="cat", base_model="org/base"), tmp_path / "cat")
    got = load_file(tmp_path / "cat" / "adapter_model.safetensors")
    sources = [load_file(f / "adapter_model.safetensors") for f in (patterned, other)]
    a_name = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    b_name = a_name.replace("lora_A", "lora_B")
    want = sum(w * (8 / 2) * s[b_name] @ s[a_name] for w, s in zip((0.5, 2.0), sources, strict=True))
    torch.testing.assert_close(got[b_name] @ got[a_name], want)
    assert got[a_name].shape == (8, 16) and not got[a_name][4:].any(), "cat's rank is the sum of the adapters' r, zero-padded"


def problems(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    return err.value.problems


def test_recipe_problems_are_listed_with_their_key_paths(family: dict[str, Path], adapters: dict[str, Path]) -> None:
    good = recipe(family, adapters, SAME_RANK, "ties", density=0.5)
    found = problems({**good, "merge_method": "slerp", "parameters": {"density": 1.5, "svd_rank": 0, "gamma": 1}, "tokenizer_source": "base",
                      "models": [{"model": str(adapters["a"]), "parameters": {"weight": [0.1, 0.2]}}, {"model": f"other+{adapters['b']}", "parameters": {}}]})
    assert found == [
        "merge_method: 'slerp' is not one of PEFT's combination types, which `output: adapter` uses: " + ", ".join(COMBINATIONS),
        "tokenizer_source: not used with `output: adapter`, which combines whole adapters (no layers, no tokenizer); remove it",
        "models[0].parameters.weight: [0.1, 0.2] -> one number (gradients and filters do not apply to adapter merges)",
        f"models[1].model: its base other is not {family['base']}; adapter merges need adapters of one base",
        "models[1].parameters.weight: required: a number, the adapter's share (negative subtracts it)",
        "parameters.density: 1.5 -> Input should be less than or equal to 1",
        "parameters.svd_rank: 0 -> Input should be greater than 0",
        "parameters.gamma: unknown parameter of adapter merges; allowed: density, majority_sign_method, svd_rank, svd_clamp, svd_full_matrices, svd_driver",
    ]
    assert problems({**good, "parameters": {"svd_rank": 2}}) == [
        "parameters.svd_rank: not used by ties; remove it (it is read by svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd)",
        "parameters: density is required by ties (the fraction of each adapter's entries kept, 0 < density <= 1)",
    ]
    unbased = {k: v for k, v in good.items() if k != "base_model"} | {"models": [{"model": str(adapters["a"]), "parameters": {"weight": 1.0}}]}
    assert problems(unbased) == [f"models[0].model: {adapters['a']} is not an adapter; with `output: adapter` write BASE+ADAPTER (the base model, "
                                 "then the adapter), or set base_model and list the adapters alone"]
    assert problems({**good, "output": "adaptor"})[0] == "output: 'adaptor' -> Input should be 'model' or 'adapter'"
    assert parse_recipe({**good, "output": "model", "merge_method": "ties", "models": [{"model": str(family["ft_a"]), "parameters": {"weight": 1}}]}).output == "model"


def test_adapters_that_cannot_be_combined_are_refused(family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(IncompatibleModelsError, match="every adapter needs the same rank"):
        plan_adapter_merge(parse_recipe(recipe(family, adapters, MIXED_RANKS, "ties", density=0.5)))
    with pytest.raises(IncompatibleModelsError, match="svd_rank 20 is larger than the module's smaller side 16"):
        plan_adapter_merge(parse_recipe(recipe(family, adapters, MIXED_RANKS, "svd", svd_rank=20)))
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**json.loads((adapters["a"] / "adapter_config.json").read_text()), "use_dora": True}))
    with pytest.raises(ModelNotFoundError, match="DoRA"):
        plan_adapters([AdapterInput(key="dora", folder=dora, weight=1.0)], combination="cat", base_model="b")
    wide = tmp_path / "wide-base-adapter"
    peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**dict(CONFIG, hidden_size=32))), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(wide)
    with pytest.raises(IncompatibleModelsError, match=r"model.layers.0.self_attn.q_proj: the adapters are not of one base, the module's sizes differ \(a: linear, in 16"):
        plan_adapters([AdapterInput(key="a", folder=adapters["a"], weight=1.0), AdapterInput(key="w", folder=wide, weight=1.0)], combination="cat", base_model="b")
    saved = make_adapter(family["base"], tmp_path / "saved", 40, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ModelNotFoundError, match="modules_to_save"):
        plan_adapters([AdapterInput(key="saved", folder=saved, weight=1.0)], combination="cat", base_model="b")
    with pytest.raises(RecipeError, match="plan_merge"):
        plan_adapter_merge(parse_recipe({"merge_method": "linear", "models": [{"model": str(family["ft_a"]), "parameters": {"weight": 1}}]}))


def test_equal_magnitudes_at_the_density_threshold_keep_the_lowest_index() -> None:
    tensor = torch.tensor([3.0, -1.0, 1.0, 1.0, -2.0])
    kept = combine([tensor], [1.0], COMBINATIONS["magnitude_prune"], CombinationOptions(density=0.6), [0])
    assert kept.tolist() == [3.0, -1.0, 0.0, 0.0, -2.0]


def test_the_cli_plans_and_merges_adapter_recipes(family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(recipe(family, adapters, MIXED_RANKS, "cat")))
    planned = CliRunner().invoke(app, ["plan", str(path)])
    assert planned.exit_code == 0, planned.output
    assert "cat merge of 3 adapter(s)" in planned.output and "down_proj" in planned.output and "modules: 12   r: 16" in planned.output
    merged = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert merged.exit_code == 0, merged.output
    digest = hashlib.sha256((tmp_path / "out" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert "12 modules, r 16" in " ".join(merged.output.split()) and digest in merged.output
    assert "output: adapter" in (tmp_path / "out" / "README.md").read_text()
    again = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert again.exit_code == 1 and "already exists" in " ".join(again.output.split())
