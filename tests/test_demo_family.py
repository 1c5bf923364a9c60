"""The demo skills family and its LoRA adapters: files, cards, cache, determinism, held-out split."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from demo_family_fixtures import EVALS
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from mergeflow.demo_family.adapters import AdapterSettings, build_adapters, family_adapters
from mergeflow.demo_family.build import MARKER, FamilySettings, build_family, family_models
from mergeflow.demo_family.skills import SKILLS, pretraining_item
from mergeflow.demo_family.test_sets import write_test_sets
from mergeflow.demo_family.tokenizer import build_tokenizer
from mergeflow.demo_family.training import ModelShape, TrainSettings, accuracy

# A plugin, not an import: imported fixtures would be one session fixture per module (two builds).
pytest_plugins = ["demo_family_fixtures"]

MODEL_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
}
FINETUNES = list(FamilySettings().finetunes)
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
ADAPTER_MIN = 0.7
"""Greedy exact match of base + adapter on the first 100 test items of its skill; measured on the pinned build
(run_pinned): add 0.88, reverse 1.0, cipher 0.77, lower 0.96, spell 1.0 (before pinning: 0.89 (cipher) to 1.0)."""


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _front_matter(card: Path) -> dict:
    _, header, _ = card.read_text().split("---\n", 2)
    return yaml.safe_load(header)


@pytest.mark.slow
def test_family_has_a_base_and_one_model_per_skill(demo_family):
    assert list(demo_family.models) == ["base", *FINETUNES]
    assert json.loads((demo_family.root / MARKER).read_text())["key"] == demo_family.key
    for name, folder in demo_family.models.items():
        assert MODEL_FILES <= {p.name for p in folder.iterdir()}, name
        config = AutoConfig.from_pretrained(folder)
        assert config.model_type == "llama"
        with safe_open(folder / "model.safetensors", "pt") as weights:
            n_params = sum(_numel(weights, key) for key in weights.keys())  # noqa: SIM118 (not iterable)
        assert 100_000 <= n_params <= 5_000_000


def _numel(weights, key: str) -> int:
    count = 1
    for dim in weights.get_slice(key).get_shape():
        count *= dim
    return count


@pytest.mark.slow
def test_cards_name_the_base(demo_family):
    assert "base_model" not in _front_matter(demo_family.models["base"] / "README.md")
    for skill in FINETUNES:
        meta = _front_matter(demo_family.models[skill] / "README.md")
        assert meta["base_model"] == "../base"
        assert (demo_family.models[skill] / meta["base_model"]).resolve() == demo_family.models["base"].resolve()
        assert f"skill-{skill}" in meta["tags"]


@pytest.mark.slow
def test_tokenizer_is_char_level_without_special_tokens_on_encode(demo_family):
    tokenizer = AutoTokenizer.from_pretrained(demo_family.models["base"])
    ids = tokenizer("47+8=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    assert tokenizer.decode(ids) == "47+8="
    assert tokenizer("47+8=")["input_ids"] == ids
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


@pytest.mark.slow
def test_second_call_is_cached(demo_family):
    again = build_family(demo_family.root)
    assert again.cached
    assert again.seconds < 1
    assert again.models == demo_family.models


@pytest.mark.slow
def test_adapters_are_peft_folders_of_the_base(demo_family, demo_adapters):
    assert list(demo_adapters.models) == list(SKILLS) == list(family_adapters(demo_family.root))
    assert demo_adapters.root == demo_family.root / "adapters" and list(family_models(demo_family.root)) == ["base", *FINETUNES]
    for skill, folder in demo_adapters.models.items():
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}, skill
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 16, 64)
        assert config["target_modules"] == PROJECTIONS and config["base_model_name_or_path"] == "../../base"
        meta = _front_matter(folder / "README.md")
        assert meta["library_name"] == "peft" and f"skill-{skill}" in meta["tags"] and meta["base_model"] == config["base_model_name_or_path"]
        assert (folder / meta["base_model"]).resolve() == demo_family.models["base"].resolve()
        with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
            names = set(weights.keys())
        assert len(names) == 2 * len(PROJECTIONS) * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)


@pytest.mark.slow
def test_each_adapter_learned_its_skill_and_only_that(demo_family, demo_adapters):
    tokenizer = build_tokenizer()
    base = LlamaForCausalLM.from_pretrained(demo_family.models["base"])
    for skill, folder in demo_adapters.models.items():
        items = SKILLS[skill].test_items()[:100]
        assert accuracy(base, tokenizer, items) <= 0.05, skill
        tuned = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(demo_family.models["base"]), folder)
        assert accuracy(tuned, tokenizer, items) >= ADAPTER_MIN, skill
        others = {other: accuracy(tuned, tokenizer, SKILLS[other].test_items()[:50]) for other in SKILLS if other != skill}
        assert max(others.values()) <= 0.05, (skill, others)


@pytest.mark.slow
def test_second_adapters_call_is_cached(demo_family, demo_adapters):
    again = build_adapters(demo_family)
    assert again.cached and again.seconds < 1 and again.models == demo_adapters.models and again.key == demo_adapters.key


@pytest.mark.slow
def test_rebuild_gives_the_same_bytes(demo_family, demo_adapters, demo_family_rebuild):
    process, rebuilt = demo_family_rebuild
    assert process.wait(timeout=900) == 0, (rebuilt.parent / "build.log").read_text()
    assert _hashes(rebuilt) == _hashes(demo_family.root)
    assert any(name.startswith("adapters/") for name in _hashes(rebuilt))


TINY = FamilySettings(
    shape=ModelShape(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    base=TrainSettings(steps=2, learning_rate=1e-3),
    finetunes={"add": TrainSettings(steps=1, learning_rate=1e-3)},
)
TINY_ADAPTERS = AdapterSettings(skills={"add": TrainSettings(steps=1, learning_rate=1e-3)})


@pytest.mark.slow  # five builds, each training in its own child process (run_pinned): 80 s on the loaded 2-core machine
def test_adapters_have_their_own_key_under_the_family(tmp_path):
    torch.set_num_threads(1)
    family = build_family(tmp_path / "family", settings=TINY)
    with pytest.raises(FileNotFoundError, match="mergeflow demo-models"):
        family_adapters(family.root)
    built = build_adapters(family, settings=TINY_ADAPTERS)
    assert not built.cached and family_adapters(family.root) == built.models == {"add": family.root / "adapters" / "add"}
    assert build_adapters(family, settings=TINY_ADAPTERS).cached
    assert build_family(family.root, settings=TINY).cached, "adapters do not touch the family's key"

    other = build_adapters(family, settings=AdapterSettings(skills={"lower": TrainSettings(steps=1, learning_rate=1e-3)}))
    assert not other.cached and other.key != built.key and family_adapters(family.root) == {"lower": family.root / "adapters" / "lower"}
    assert not (family.root / "adapters" / "add").exists() and not list(family.root.glob(".*"))

    rebuilt = build_family(family.root, settings=TINY, force=True)
    with pytest.raises(FileNotFoundError):
        family_adapters(rebuilt.root)  # a rebuilt family drops adapters trained on the old one


def test_refuses_a_folder_that_is_not_a_family(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no demo family"):
        build_family(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("skill", list(SKILLS))
def test_test_items_never_appear_in_training(skill):
    held_out = {item.prompt for item in SKILLS[skill].test_items()}
    assert len(held_out) >= 100
    rng = random.Random(0)
    assert not held_out & {SKILLS[skill].train_item(rng).prompt for _ in range(5000)}


def test_skills_do_not_appear_in_pretraining():
    rng = random.Random(0)
    prompts = {pretraining_item(rng).prompt for _ in range(5000)}
    for skill in SKILLS.values():
        assert not prompts & {item.prompt for item in skill.test_items()}


def test_committed_test_sets_are_current(tmp_path):
    written = write_test_sets(tmp_path)
    for skill, path in written.items():
        assert path.read_bytes() == (EVALS / "data" / f"{skill}.jsonl").read_bytes()
