"""mergekit's example recipes (tests/mergekit_examples, unchanged) parse, check and merge, on tiny local families
standing in for the Hub models they name; the merged models load with transformers and generate."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_family import build_arch_family
from safetensors.torch import load_file
from tiny_family import CONFIG, base_state, fine_tune, write_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mergeflow.cli import app

pytestmark = pytest.mark.slow  # builds a 40-layer family and merges six recipes through the CLI (~40 s)

EXAMPLES = Path(__file__).parent / "mergekit_examples"
LLAMA_13B_LAYERS = 40
LLAMA_NAMES = {
    "TheBloke/Llama-2-13B-fp16": "base",
    "psmathur/orca_mini_v3_13b": "ft_a",
    "garage-bAInd/Platypus2-13B": "ft_b",
    "WizardLM/WizardLM-13B-V1.2": "ft_c",
    "WizardLM/WizardMath-13B-V1.0": "ft_d",
    "model_a": "base",
    "model_b": "ft_a",
}
MISTRAL_NAMES = {"mistralai/Mistral-7B-v0.1": "base", "mistralai/Mistral-7B-Instruct-v0.2": "ft_a", "BioMistral/BioMistral-7B": "ft_b"}
EXPECTED_LAYERS = {"orcamini-platy-44layer": 44, "bio-merge": 4}
"""Output layers where they are not the family's: the 44-layer frankenmerge (24 + 20 layers), the 4-layer Mistral."""


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hub name -> local folder: a 40-layer tiny Llama family (Llama-2-13B's layer count) and a tiny Mistral family."""
    root = tmp_path_factory.mktemp("mergekit-examples")
    config = {**CONFIG, "num_hidden_layers": LLAMA_13B_LAYERS}
    base = base_state(config=config)
    llama = {"base": write_model(root / "llama" / "base", base, config=config)}
    for i, name in enumerate(("ft_a", "ft_b", "ft_c", "ft_d"), start=1):
        llama[name] = write_model(root / "llama" / name, fine_tune(base, i, sign=-1.0 if name == "ft_d" else 1.0), config=config)
    mistral = build_arch_family(root / "mistral", "mistral")
    return {**{hub: llama[k] for hub, k in LLAMA_NAMES.items()}, **{hub: mistral[k] for hub, k in MISTRAL_NAMES.items() if k in mistral},
            "BioMistral/BioMistral-7B": mistral["ft_b"]}


def localised(example: Path, families: dict[str, Path], folder: Path) -> Path:
    """The example with every model name replaced by its local stand-in (longest names first)."""
    text = example.read_text()
    for hub in sorted(families, key=len, reverse=True):
        text = text.replace(f"model: {hub}\n", f"model: {families[hub]}\n").replace(f"base_model: {hub}\n", f"base_model: {families[hub]}\n")
    assert not any(f"model: {hub}\n" in text for hub in families), text
    recipe = folder / example.name
    recipe.write_text(text)
    return recipe


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.stem)
def test_mergekit_example_parses_checks_merges_and_loads(example: Path, families: dict[str, Path], tmp_path: Path) -> None:
    recipe = localised(example, families, tmp_path)
    runner = CliRunner()
    checked = runner.invoke(app, ["check", str(recipe)])
    assert checked.exit_code == 0, checked.output
    merged = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert merged.exit_code == 0, merged.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == EXPECTED_LAYERS.get(example.stem, LLAMA_13B_LAYERS)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors.values())  # every example asks for a 16-bit dtype
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_the_44_layer_frankenmerge_stacks_the_layers_it_names(families: dict[str, Path], tmp_path: Path) -> None:
    """orcamini-platy-44layer: output layers 0-23 are orca's 0-23, 24-43 are Platypus's 20-39 (in float16)."""
    recipe = localised(EXAMPLES / "orcamini-platy-44layer.yml", families, tmp_path)
    assert CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out")]).exit_code == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    orca = load_file(families["psmathur/orca_mini_v3_13b"] / "model.safetensors")
    platypus = load_file(families["garage-bAInd/Platypus2-13B"] / "model.safetensors")
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(merged[name.format(23)], orca[name.format(23)].half())
    assert torch.equal(merged[name.format(24)], platypus[name.format(20)].half())
    assert torch.equal(merged[name.format(43)], platypus[name.format(39)].half())
    assert torch.equal(merged["lm_head.weight"], platypus["lm_head.weight"].half())  # after the layers: the last slice's
