"""Architectures besides Llama: tiny Mistral, Qwen2, Gemma, Gemma2, GPT-NeoX, Phi and two vision-language models
(LLaVA, Qwen2-VL), merged through the planner and engine, loaded with transformers and generating."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arch_family import MULTIMODAL, auto_class, build_arch_family
from safetensors.torch import load_file
from transformers import AutoTokenizer

from merge_ops.compatibility import compatibility_report
from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError
from merge_ops.headers import read_local_headers
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import parse_recipe

TEXT_KINDS = ("mistral", "qwen2", "gemma", "gemma2", "gpt_neox", "phi")
TIED = {"qwen2", "gemma", "gemma2"}
LAYERS = {  # decoder layer prefix, then a tensor the layers have
    "gpt_neox": ("gpt_neox.layers.", "attention.query_key_value.bias"),
    "phi": ("model.layers.", "self_attn.dense.bias"),
    "llava": ("language_model.model.layers.", "mlp.down_proj.weight"),
}
FIRST_AND_LAST = {  # passthrough: from the first slice's model, from the last slice's model
    "gpt_neox": (["gpt_neox.embed_in.weight"], ["embed_out.weight", "gpt_neox.final_layer_norm.bias"]),
    "phi": (["model.embed_tokens.weight"], ["lm_head.weight", "lm_head.bias", "model.final_layernorm.bias"]),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("arch")
    return {kind: build_arch_family(root / kind, kind) for kind in (*TEXT_KINDS, *MULTIMODAL)}


def load(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def close(merged: torch.Tensor, expected: torch.Tensor) -> bool:
    """Float tensors up to rounding; others (GPT-NeoX's boolean attention mask) exactly: they are taken, not merged."""
    return torch.allclose(merged, expected, atol=1e-6) if expected.is_floating_point() else torch.equal(merged, expected)


def merge(recipe: dict, out: Path) -> None:
    merge_model(plan_merge(parse_recipe(recipe)), out)


def loads_and_generates(kind: str, folder: Path) -> None:
    """The folder loads with transformers (every weight from the files) and greedily generates four tokens after a prompt."""
    model, info = auto_class(kind).from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = AutoTokenizer.from_pretrained(folder)
    written = load(folder)
    embeddings = next(n for n in written if n.endswith(("embed_tokens.weight", "embed_in.weight")))
    assert torch.equal(model.get_input_embeddings().weight, written[embeddings])
    prompt = tokenizer("7+8=", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert isinstance(tokenizer.decode(out[0]), str)
    if kind in TIED:
        assert "lm_head.weight" not in written and model.config.tie_word_embeddings
        assert torch.equal(model.get_output_embeddings().weight, written[embeddings])


@pytest.mark.parametrize("kind", (*TEXT_KINDS, *MULTIMODAL))
def test_linear_merge_loads_and_generates(kind: str, families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    fam = families[kind]
    recipe = {"merge_method": "linear", "models": [{"model": str(fam["ft_a"]), "parameters": {"weight": 0.5}}, {"model": str(fam["ft_b"]), "parameters": {"weight": 0.5}}]}
    merge(recipe, tmp_path / "out")
    merged, a, b = load(tmp_path / "out"), load(fam["ft_a"]), load(fam["ft_b"])
    assert merged.keys() == a.keys()
    assert all(close(merged[n], (a[n] + b[n]) / 2 if a[n].is_floating_point() else a[n]) for n in a)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {**json.loads((fam["base"] / "config.json").read_text()), "torch_dtype": "float32"}
    loads_and_generates(kind, tmp_path / "out")


@pytest.mark.parametrize("kind", (*TEXT_KINDS, *MULTIMODAL))
def test_task_arithmetic_merges_every_tensor(kind: str, families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    fam = families[kind]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
              "models": [{"model": str(fam["ft_a"]), "parameters": {"weight": 1.0}}, {"model": str(fam["ft_b"]), "parameters": {"weight": 0.5}}]}
    merge(recipe, tmp_path / "out")
    merged, base, a, b = load(tmp_path / "out"), load(fam["base"]), load(fam["ft_a"]), load(fam["ft_b"])
    assert merged.keys() == base.keys()
    assert all(close(merged[n], base[n] + (a[n] - base[n]) + 0.5 * (b[n] - base[n]) if base[n].is_floating_point() else base[n]) for n in base)
    loads_and_generates(kind, tmp_path / "out")


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_passthrough_slices_stack_layers(kind: str, families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    fam = families[kind]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fam["ft_a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(fam["ft_b"]), "layer_range": [1, 4]}]},
    ]}
    merge(recipe, tmp_path / "out")
    merged, a, b = load(tmp_path / "out"), load(fam["ft_a"]), load(fam["ft_b"])
    prefix, rest = LAYERS.get(kind, ("model.layers.", "mlp.down_proj.weight"))
    for out_layer, (source, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(merged[f"{prefix}{out_layer}.{rest}"], source[f"{prefix}{layer}.{rest}"])
    first, last = FIRST_AND_LAST.get(kind, (["model.embed_tokens.weight"], ["model.norm.weight"]))
    assert all(torch.equal(merged[n], a[n]) for n in first) and all(torch.equal(merged[n], b[n]) for n in last)
    config, source = json.loads((tmp_path / "out" / "config.json").read_text()), json.loads((fam["base"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    if "layer_types" in source:  # one entry per output layer, from the layer it came from
        assert config["layer_types"] == [source["layer_types"][i] for i in (0, 1, 2, 1, 2, 3)]
    loads_and_generates(kind, tmp_path / "out")


def test_gemma2_layer_types_follow_their_layers(families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """Alternating sliding/full attention: a slice that starts on an odd layer keeps each layer's own attention type."""
    fam = families["gemma2"]
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(fam["ft_a"]), "layer_range": [1, 4]}]}]}
    merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    loads_and_generates("gemma2", tmp_path / "out")


@pytest.mark.parametrize("kind", MULTIMODAL)
def test_vision_language_slices_are_refused_naming_the_parts(kind: str, families: dict[str, dict[str, Path]]) -> None:
    fam = families[kind]
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(fam["ft_a"]), "layer_range": [0, 2]}]}]}
    with pytest.raises(IncompatibleModelsError) as err:
        plan_merge(parse_recipe(recipe))
    parts = {"llava": "multi_modal_projector, vision_tower", "qwen2_vl": "visual"}[kind]
    assert f"a {kind} model with {parts} beside its text decoder" in str(err.value) and "`models:`" in str(err.value)


def test_vision_tower_layers_get_their_own_gradient_position(families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """t of a gradient runs over the vision tower's 2 layers as over the decoder's 4: first layer t=0, last t=1."""
    fam = families["llava"]
    recipe = {"merge_method": "slerp", "base_model": str(fam["base"]), "models": [{"model": str(fam["base"])}, {"model": str(fam["ft_a"])}],
              "parameters": {"t": [0.0, 1.0]}}
    merge(recipe, tmp_path / "out")
    merged, base, a = load(tmp_path / "out"), load(fam["base"]), load(fam["ft_a"])
    vision, decoder = "vision_tower.encoder.layers.{}.mlp.fc1.weight", "language_model.model.layers.{}.mlp.up_proj.weight"
    for name, last in ((vision, 1), (decoder, 3)):
        assert torch.allclose(merged[name.format(0)], base[name.format(0)], atol=1e-6)
        assert torch.allclose(merged[name.format(last)], a[name.format(last)], atol=1e-6)
    assert torch.equal(merged["multi_modal_projector.linear_1.weight"], base["multi_modal_projector.linear_1.weight"])  # outside layers: t=0


def test_layer_layout_the_config_does_not_count_is_a_problem(families: dict[str, dict[str, Path]]) -> None:
    fam = families["mistral"]
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(fam[k]), "parameters": {"weight": 1.0}} for k in ("ft_a", "ft_b")]})
    a, b = (read_local_headers(ref.key, Path(ref.path)) for ref in recipe.referenced_models)
    deeper = b.model_copy(update={"config": {**b.config, "num_hidden_layers": 6}})
    uncounted = b.model_copy(update={"config": {k: v for k, v in b.config.items() if k != "num_hidden_layers"}})
    problems = [str(p) for p in compatibility_report(recipe, {a.key: a, b.key: deeper}).problems]
    assert any("config.json counts 6 decoder layers, the tensor names hold 4 layers (0..3), under model.layers." in p for p in problems)
    problems = [str(p) for p in compatibility_report(recipe, {a.key: a, b.key: uncounted}).problems]
    assert any("config.json has none of num_hidden_layers, n_layer, num_layers" in p and "not supported" in p for p in problems)
