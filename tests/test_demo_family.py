"""The demo skills family: files, cards, cache, determinism, held-out split."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import yaml
from demo_family_fixtures import EVALS
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from mergeflow.demo_family.build import MARKER, build_family
from mergeflow.demo_family.skills import SKILLS, pretraining_item
from mergeflow.demo_family.test_sets import write_test_sets

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
    assert list(demo_family.models) == ["base", *SKILLS]
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
    for skill in SKILLS:
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
def test_rebuild_gives_the_same_bytes(demo_family, demo_family_rebuild):
    process, rebuilt = demo_family_rebuild
    assert process.wait(timeout=600) == 0, (rebuilt.parent / "build.log").read_text()
    assert _hashes(rebuilt) == _hashes(demo_family.root)


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
