"""Different vocabularies: the merged vocabulary, rows lined up by token, tokenizer files, padding, tied embeddings,
truncation, and what the compatibility report says (fine-tunes that added ChatML tokens, see ``vocab_family``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_family import base_state, fine_tune
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_family import CHATML, build_vocab_family, write_shuffled

from merge_ops.compatibility import compatibility_report
from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError, RecipeError
from merge_ops.plan import MergePlan, plan_merge, read_models
from merge_ops.recipe_file import parse_recipe
from merge_ops.vocabulary import OutputTokenizer, Vocabularies
from merge_ops.vocabulary_rows import VocabularyRows, line_up

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHAT_TEXT = "ab<|im_start|>cd<|im_end|>"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (64 tokens), ft_a (+ ChatML, 66 rows), ft_b (the base's vocabulary), ft_neg (+ ChatML, 72 rows)."""
    return build_vocab_family(tmp_path_factory.mktemp("vocab"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def recipe(family: dict[str, Path], method: str, members: dict[str, float], **extra: object) -> dict:
    data = {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32", **extra}
    data["models"] = [{"model": str(family[name]), "parameters": {"weight": w}} for name, w in members.items()]
    return data


def merge(data: dict, out: Path) -> MergePlan:
    plan = plan_merge(parse_recipe(data))
    merge_model(plan, out)
    return plan


def test_union_of_added_tokens_loads_round_trips_and_generates(vocab: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = merge(recipe(vocab, "ties", {"ft_a": 0.6, "ft_b": 0.4, "ft_neg": 0.3}, parameters={"density": 0.5}, tokenizer_source="union"), out)
    assert plan.vocab_size == 66 and plan.tokenizer_build is not None and plan.tokenizer_build.source == "union"
    merged = tensors(out)
    assert merged[EMBED].shape == merged[HEAD].shape == (66, 16)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    tokenizer, chat = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(vocab["ft_a"])
    assert len(tokenizer) == 66 and tokenizer.get_vocab() == chat.get_vocab()
    assert {i: (t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items() if i >= 64} == {64: (CHATML[0], True), 65: (CHATML[1], True)}
    ids = tokenizer(CHAT_TEXT)["input_ids"]
    assert ids == chat(CHAT_TEXT)["input_ids"] and 64 in ids and 65 in ids and tokenizer.decode(ids) == CHAT_TEXT
    model = AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert generated.shape == (1, len(ids) + 4) and int(generated.max()) < 66


def test_rows_are_merged_over_the_models_that_have_the_token(vocab: dict[str, Path], tmp_path: Path) -> None:
    plan = merge(recipe(vocab, "task_arithmetic", {"ft_a": 1.0, "ft_b": 0.5}, tokenizer_source="union"), tmp_path / "out")
    merged, base, a, b = tensors(tmp_path / "out"), tensors(vocab["base"]), tensors(vocab["ft_a"]), tensors(vocab["ft_b"])
    job = next(t for s in plan.shards for t in s.tensors if t.name == EMBED)
    assert job.vocabulary is not None and job.vocabulary.copies == [[(0, 0, 66)], [(0, 0, 64)], [(0, 0, 64)]]  # ft_a, ft_b, base
    assert job.vocabulary.fills == [(64, [(0, 64)]), (65, [(0, 65)])]  # ft_a's rows fill the ChatML rows of the others
    assert MergePlan.model_validate_json(plan.model_dump_json()) == plan  # shards run from the serialised plan
    for name in (EMBED, HEAD):
        shared = base[name] + 1.0 * (a[name][:64] - base[name]) + 0.5 * (b[name] - base[name])
        torch.testing.assert_close(merged[name][:64], shared, rtol=0, atol=1e-6)
        assert torch.equal(merged[name][64:], a[name][64:])  # only ft_a has them: its rows, the others add nothing


def test_tokens_force_sources_and_padding(vocab: dict[str, Path], tmp_path: Path) -> None:
    tokens = {
        CHATML[0]: {"source": str(vocab["ft_a"]), "force": True},
        CHATML[1]: {"source": {"kind": "model_token", "model": str(vocab["base"]), "token": "</s>"}},
        "<tool>": {"source": {"kind": "zero"}},
    }
    members = {"ft_a": 1.0, "ft_b": 0.5, "base": 0.25}
    out = tmp_path / "out"
    plan = merge(recipe(vocab, "linear", members, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 32}), out)
    assert plan.vocab_size == 96 and json.loads((out / "config.json").read_text())["vocab_size"] == 96
    merged, base, a = tensors(out), tensors(vocab["base"]), tensors(vocab["ft_a"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 67 and tokenizer.convert_tokens_to_ids("<tool>") == 66
    for name in (EMBED, HEAD):
        rows = merged[name]
        assert rows.shape == (96, 16)
        torch.testing.assert_close(rows[64], a[name][64], rtol=0, atol=1e-6)  # forced: every model takes ft_a's row
        torch.testing.assert_close(rows[65], (1.0 * a[name][65] + 0.75 * base[name][2]) / 1.75, rtol=0, atol=1e-6)  # lacking models: base's </s>
        assert torch.equal(rows[66], torch.zeros(16))
        assert torch.equal(rows[67:], rows[67].expand(29, 16))  # padding: each model's mean row, merged
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer(CHAT_TEXT + "<tool>")["input_ids"]
    assert model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False, pad_token_id=2).shape == (1, len(ids) + 2)


def test_one_models_tokenizer_drops_its_padding_rows(vocab: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = merge(recipe(vocab, "task_arithmetic", {"ft_neg": 1.0}, tokenizer_source=str(vocab["ft_neg"])), out)
    merged, neg = tensors(out), tensors(vocab["ft_neg"])
    assert plan.vocab_size == 66 and merged[EMBED].shape == (66, 16)  # ft_neg's 72 rows hold 66 tokens
    assert torch.equal(merged[EMBED][64:], neg[EMBED][64:66])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(vocab["ft_neg"]).get_vocab()


def test_base_vocabulary_drops_added_tokens(vocab: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = merge(recipe(vocab, "task_arithmetic", {"ft_a": 1.0}, tokenizer_source="base"), out)
    merged, base, a = tensors(out), tensors(vocab["base"]), tensors(vocab["ft_a"])
    assert plan.vocab_size == 64 and json.loads((out / "config.json").read_text())["vocab_size"] == 64
    torch.testing.assert_close(merged[EMBED], a[EMBED][:64], rtol=0, atol=1e-6)
    assert len(AutoTokenizer.from_pretrained(out)) == 64 and base.keys() == merged.keys()


def test_base_tokens_past_its_vocab_size_are_stripped(vocab: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base_with_chat_tokenizer"  # a tokenizer that gained ChatML tokens without the embedding growing
    shutil.copytree(vocab["base"], base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(vocab["ft_a"] / name, base / name)
    family = {**vocab, "base": base}
    out = tmp_path / "out"
    plan = merge(recipe(family, "task_arithmetic", {"ft_a": 1.0}, tokenizer_source="base"), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert plan.vocab_size == 64 and len(tokenizer) == 64 and CHATML[0] not in tokenizer.get_vocab()
    assert tensors(out)[EMBED].shape == (64, 16)


def test_tied_embeddings(tmp_path: Path) -> None:
    tied = build_vocab_family(tmp_path / "tied", tied=True)
    out = tmp_path / "out"
    merge(recipe(tied, "task_arithmetic", {"ft_a": 1.0, "ft_b": 0.5}, tokenizer_source="union"), out)
    merged = tensors(out)
    assert HEAD not in merged and merged[EMBED].shape == (66, 16)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 66
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight, merged[EMBED])


def test_a_tied_fine_tune_lends_its_embedding_as_lm_head(vocab: dict[str, Path], tmp_path: Path) -> None:
    tied = build_vocab_family(tmp_path / "tied", tied=True)
    data = recipe(vocab, "task_arithmetic", {"ft_a": 1.0}, tokenizer_source="union")
    data["models"].append({"model": str(tied["ft_b"]), "parameters": {"weight": 0.5}})
    parsed = parse_recipe(data)
    notes = [f for f in compatibility_report(parsed, read_models(parsed)).findings if f.check == "tied_embeddings"]
    assert [(n.severity, n.model) for n in notes] == [("note", str(tied["ft_b"]))] and "stores no lm_head.weight" in notes[0].message
    merge(data, tmp_path / "out")
    merged, base, a, b = tensors(tmp_path / "out"), tensors(vocab["base"]), tensors(vocab["ft_a"]), tensors(tied["ft_b"])
    expected = base[HEAD] + 1.0 * (a[HEAD][:64] - base[HEAD]) + 0.5 * (b[EMBED] - base[HEAD])
    torch.testing.assert_close(merged[HEAD][:64], expected, rtol=0, atol=1e-6)


def test_a_tied_base_gets_the_head_the_others_have(vocab: dict[str, Path], tmp_path: Path) -> None:
    tied = build_vocab_family(tmp_path / "tied", tied=True)
    data = recipe({**vocab, "base": tied["base"]}, "task_arithmetic", {"ft_a": 1.0, "ft_b": 0.5}, tokenizer_source="union")
    parsed = parse_recipe(data)
    notes = [f for f in compatibility_report(parsed, read_models(parsed)).findings if f.check == "tied_embeddings"]
    assert {n.model for n in notes} == {str(vocab["ft_a"]), str(vocab["ft_b"])} and all(n.severity == "note" for n in notes)
    out = tmp_path / "out"
    merge(data, out)
    merged, base, a, b = tensors(out), tensors(tied["base"]), tensors(vocab["ft_a"]), tensors(vocab["ft_b"])
    assert merged[HEAD].shape == (66, 16)  # as mergekit: the head is merged, the base's embedding standing in for its own
    expected = base[EMBED] + 1.0 * (a[HEAD][:64] - base[EMBED]) + 0.5 * (b[HEAD] - base[EMBED])
    torch.testing.assert_close(merged[HEAD][:64], expected, rtol=0, atol=1e-6)


def test_same_vocabulary_plans_as_before(vocab: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_merge(parse_recipe(recipe(vocab, "ties", {"ft_b": 0.5}, parameters={"density": 0.5}, tokenizer_source="union")))
    assert plan.tokenizer_build is None and plan.vocab_size is None
    dumped = plan.model_dump_json()
    assert '"vocabulary"' not in dumped and '"vocab_size"' not in dumped and '"tokenizer_build"' not in dumped
    merge_model(plan, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (vocab["base"] / "tokenizer.json").read_bytes()


def test_report_names_the_tokens_and_the_fixes(vocab: dict[str, Path]) -> None:
    data = recipe(vocab, "task_arithmetic", {"ft_a": 1.0, "ft_b": 0.5, "ft_neg": 0.5})
    parsed = parse_recipe(data)
    report = compatibility_report(parsed, read_models(parsed))
    found = {f.model: f for f in report.findings if f.check == "vocabulary"}
    assert set(found) == {str(vocab["ft_a"]), str(vocab["ft_neg"])} and all(f.severity == "problem" for f in found.values())
    chat = found[str(vocab["ft_a"])].message
    assert "vocab_size is 66" in chat and "+2 rows" in chat and "'<|im_start|>', '<|im_end|>'" in chat
    assert "`tokenizer_source: union`" in chat and "`tokenizer_source: base`" in chat and f"`tokenizer_source: {vocab['ft_a']}`" in chat
    assert "unsafe_truncate_embeddings: true" in chat
    assert "vocab_size is 72" in found[str(vocab["ft_neg"])].message
    with pytest.raises(IncompatibleModelsError, match="im_start"):
        plan_merge(parsed)
    policy = parse_recipe({**data, "tokenizer_source": "union"})
    assert {f.severity for f in compatibility_report(policy, read_models(policy)).findings if f.check == "vocabulary"} == {"note"}


def test_same_size_other_token_order_is_lined_up_by_token(vocab: dict[str, Path], tmp_path: Path) -> None:
    shuffled = write_shuffled(tmp_path / "shuffled", fine_tune(base_state(), 2))  # ft_b, its characters in reverse order
    data = recipe(vocab, "task_arithmetic", {"ft_a": 1.0})
    data["models"].append({"model": str(shuffled), "parameters": {"weight": 0.5}})
    parsed = parse_recipe(data)
    found = [f for f in compatibility_report(parsed, read_models(parsed)).findings if f.model == str(shuffled) and f.check == "vocabulary"]
    assert [f.severity for f in found] == ["warning"] and "other tokens at 60 id(s)" in found[0].message  # the middle character stays
    merge({**data, "tokenizer_source": "union"}, tmp_path / "shuffled_out")
    merge(recipe(vocab, "task_arithmetic", {"ft_a": 1.0, "ft_b": 0.5}, tokenizer_source="union"), tmp_path / "plain_out")
    shuffled_out, plain_out = tensors(tmp_path / "shuffled_out"), tensors(tmp_path / "plain_out")
    assert all(torch.equal(shuffled_out[k], plain_out[k]) for k in plain_out)  # token for token the same model: the same merge


def test_unsafe_truncation_merges_the_common_rows(vocab: dict[str, Path], tmp_path: Path) -> None:
    data = recipe(vocab, "task_arithmetic", {"ft_a": 1.0, "ft_b": 0.5}, unsafe_truncate_embeddings=True)
    parsed = parse_recipe(data)
    warnings = [f for f in compatibility_report(parsed, read_models(parsed)).findings if f.check == "vocabulary"]
    assert [w.severity for w in warnings] == ["warning"] and "first 64 rows" in warnings[0].message
    out = tmp_path / "out"
    plan = merge(data, out)
    merged, base, a, b = tensors(out), tensors(vocab["base"]), tensors(vocab["ft_a"]), tensors(vocab["ft_b"])
    assert plan.vocab_size == 64 and plan.tokenizer_build is None
    torch.testing.assert_close(merged[EMBED], base[EMBED] + (a[EMBED][:64] - base[EMBED]) + 0.5 * (b[EMBED] - base[EMBED]), rtol=0, atol=1e-6)


def test_recipe_checks_of_tokens(vocab: dict[str, Path]) -> None:
    data = recipe(vocab, "linear", {"ft_a": 1.0, "base": 0.5})
    bad = [
        ({"tokens": {"<x>": {"source": "org/elsewhere"}}}, "not one of the recipe's models"),
        ({"tokens": {"<x>": {"force": True}}}, "force needs a source"),
        ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": str(vocab["ft_a"]), "token": "a", "token_id": 3}}}}, "exactly one of"),
        ({"pad_to_multiple_of": 0}, "greater than or equal to 1"),
    ]
    for block, message in bad:
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**data, "tokenizer": block})
    with pytest.raises(RecipeError, match="unsafe_truncate_embeddings"):
        parse_recipe({**data, "tokenizer_source": "union", "unsafe_truncate_embeddings": True})
    with pytest.raises(RecipeError, match="needs a source"):  # a new token no model has, and nothing to fill its row with
        plan_merge(parse_recipe({**data, "tokenizer": {"tokens": {"<x>": {}}}}))


def test_line_up_copies_fills_and_pads() -> None:
    a = torch.arange(6.0).reshape(3, 2)
    b = torch.arange(10.0, 14.0).reshape(2, 2)
    rows = VocabularyRows(rows=6, tokens=4, copies=[[(0, 0, 3)], [(0, 0, 1), (3, 1, 1)]], fills=[(1, [(0, 1), (1, 1)]), (2, [(0, 2)]), (3, [])])
    lined_a, lined_b = line_up([a, b], rows)
    assert lined_a.tolist()[:4] == [[0, 1], [2, 3], [4, 5], [0, 0]]  # its own rows; row 3 filled with zeros
    assert lined_b.tolist()[:4] == [[10, 11], [7, 8], [4, 5], [12, 13]]  # row 1: mean of a's and b's; row 2: a's
    assert lined_a[4:].tolist() == [[1.5, 2.25]] * 2 and lined_b[4:].tolist() == [[8.25, 9.25]] * 2  # padding: the mean row


def test_fills_prefer_the_only_model_then_the_base_then_the_mean() -> None:
    out = {"x": 0, "only_a": 1, "a_and_base": 2, "a_and_b": 3, "none": 4}
    own = {"base": {"x": 0, "a_and_base": 1}, "a": {"x": 0, "only_a": 1, "a_and_base": 2, "a_and_b": 3}, "b": {"x": 0, "a_and_b": 1}}
    vocabularies = Vocabularies(tokenizer=OutputTokenizer(source="union", models=list(own), vocab_sizes={}), out=out, rows=5, own=own,
                                original=own, tokens={}, base="base")
    rows = vocabularies.rows_for("embed", [("a", 0, 4), ("b", 1, 2), ("base", 2, 2)])
    assert rows.fills == [(1, [(0, 1)]), (2, [(2, 1)]), (3, [(0, 3), (1, 1)]), (4, [])]
    assert rows.copies == [[(0, 0, 4)], [(0, 0, 1), (3, 1, 1)], [(0, 0, 1), (2, 1, 1)]]
