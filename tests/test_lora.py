"""PEFT LoRA adapters as merge sources (``BASE+ADAPTER``): equal to PEFT's merge_and_unload followed by the same merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import merged_by_peft
from method_cases import NAMES, recipe_for
from safetensors.torch import load_file
from tiny_family import CONFIG, make_adapter
from transformers import LlamaConfig, LlamaForCausalLM

from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError, ModelNotFoundError
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import parse_recipe

peft = pytest.importorskip("peft")

ADAPTERS = {
    "lora": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(target_modules=["q_proj", "gate_proj", "down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 32}),
    "rslora": dict(target_modules=["k_proj", "up_proj"], use_rslora=True),
    "embedding_and_saved_head": dict(target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def adapters(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (adapter folder, the same adapter merged into the base by PEFT)."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        adapter = make_adapter(family["base"], root / name, seed, **options)
        made[name] = (adapter, merged_by_peft(family["base"], adapter, root / f"{name}-merged"))
    return made


def merged_tensors(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    merge_model(plan_merge(parse_recipe(recipe)), out)
    return load_file(out / "model.safetensors")


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_an_adapter_alone_is_the_base_with_its_update(name: str, family: dict[str, Path], adapters, tmp_path: Path) -> None:
    adapter, reference = adapters[name]
    recipe = {"merge_method": "linear", "models": [{"model": f"{family['base']}+{adapter}", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    got = merged_tensors(recipe, tmp_path / "out")
    want = load_file(reference / "model.safetensors")
    assert_close(got, {n: t for n, t in want.items() if n in got})
    changed = [n for n in got if not torch.equal(got[n], load_file(family["base"] / "model.safetensors")[n])]
    assert changed, "the adapter must change the weights it targets"


@pytest.mark.parametrize("method", NAMES)
def test_every_method_merges_adapter_sources_like_peft_merged_models(method: str, family: dict[str, Path], adapters, tmp_path: Path) -> None:
    """Two adapted models among the sources (BASE+ADAPTER, one with rank and alpha patterns) against the same recipe
    over the folders PEFT's merge_and_unload wrote."""
    (lora, lora_ref), (patterns, patterns_ref) = adapters["lora"], adapters["patterns"]
    adapted = {**family, "ft_a": f"{family['base']}+{lora}", "ft_b": f"{family['base']}+{patterns}"}
    by_peft = {**family, "ft_a": lora_ref, "ft_b": patterns_ref}
    got = merged_tensors(recipe_for(method, adapted, dtype="float32", seed=1), tmp_path / "adapters")
    want = merged_tensors(recipe_for(method, by_peft, dtype="float32", seed=1), tmp_path / "peft")
    assert_close(got, want)


def test_the_mergekit_dict_spelling_and_the_key(family: dict[str, Path], adapters) -> None:
    adapter = adapters["lora"][0]
    written = parse_recipe({"merge_method": "linear", "models": [{"model": {"model": str(family["base"]), "lora": str(adapter)}, "parameters": {"weight": 1.0}}]})
    ref = written.referenced_models[0]
    assert ref.key == f"{family['base']}+{adapter}" and ref.adapter_ref is not None and ref.adapter_ref.path == str(adapter)


def test_unsupported_adapters_are_named(family: dict[str, Path], adapters, tmp_path: Path) -> None:
    adapter = adapters["lora"][0]
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**json.loads((adapter / "adapter_config.json").read_text()), "use_dora": True}))
    recipe = {"merge_method": "linear", "models": [{"model": f"{family['base']}+{dora}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ModelNotFoundError, match="DoRA"):
        plan_merge(parse_recipe(recipe))
    other = LlamaForCausalLM(LlamaConfig(**dict(CONFIG, hidden_size=32)))
    wide = tmp_path / "wide-adapter"
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(wide)
    recipe["models"][0]["model"] = f"{family['base']}+{wide}"
    with pytest.raises(IncompatibleModelsError, match="does not fit"):
        plan_merge(parse_recipe(recipe))


def test_fan_in_fan_out_adapters_of_conv1d_models(tmp_path: Path) -> None:
    """GPT-2 stores its projections as Conv1D ([in, out]): PEFT's fan_in_fan_out transposes the update."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(base)
    torch.manual_seed(1)
    tuned = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    tuned.save_pretrained(tmp_path / "adapter")
    peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "reference")
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    got = merged_tensors(recipe, tmp_path / "out")
    assert_close(got, {n: t for n, t in load_file(tmp_path / "reference" / "model.safetensors").items() if n in got})
    assert not torch.equal(got["transformer.h.0.attn.c_attn.weight"], load_file(base / "model.safetensors")["transformer.h.0.attn.c_attn.weight"])
