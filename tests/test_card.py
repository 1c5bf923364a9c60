"""The one card builder (merge_ops.card): Hub ids only in base_model, local sources in the body, huggingface_hub's ModelCard."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from merge_ops.card import card_data, hub_id, read_card, reference_hub_id, render_card, sources_section


def test_a_source_is_a_hub_model_when_read_from_a_snapshot_of_its_repo(tmp_path: Path) -> None:
    assert hub_id("demo/add", "/cache/models--demo--add/snapshots/0123") == "demo/add"
    assert hub_id("demo/add@v1+demo/lora", "/cache/models--demo--add/snapshots/0123") == "demo/add"
    assert hub_id("demo/add", "/cache/models--demo--other/snapshots/0123") is None  # another repo's snapshot
    assert hub_id("demo-family/add", "/work/demo-family/add") is None and hub_id("demo/add", None) is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert reference_hub_id("org/base@main") == "org/base" and reference_hub_id(str(tmp_path / "org" / "name")) is None
    assert reference_hub_id("./base") is None


def test_merge_and_adapter_cards_follow_the_hub_conventions() -> None:
    body = "\n# Merged model\n\n" + sources_section("Models merged", {"org/base": "org/base", "/work/ft": None}, {"/work/ft": "(weight 0.5)"})
    text = render_card(card_data(method="ties", hub_ids=["org/base", "org/base"]), body)
    card = ModelCard(text)
    assert card.data.base_model == ["org/base"] and card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers" and card.data.tags == ["merge", "mergeflow", "ties"]
    assert "- `org/base`\n- `/work/ft` (local folder) (weight 0.5)\n" in card.text
    assert read_card(text) == (card.data.to_dict(), body) and read_card("# no front matter") == ({}, "# no front matter")

    local_only = ModelCard(render_card(card_data(method="ties", hub_ids=[]), body)).data
    assert local_only.base_model is None and local_only.get("base_model_relation") is None

    adapter = ModelCard(render_card(card_data(method="cat", hub_ids=["org/base", "org/other"], adapter=True, tags=["x"]), body)).data
    assert (adapter.base_model, adapter.base_model_relation, adapter.library_name) == ("org/base", "adapter", "peft")
    assert adapter.tags == ["x", "merge", "mergeflow", "cat", "lora", "peft"]
