"""LoRA extraction (``mergeflow extract-lora``): the adapter PEFT loads reproduces the fine-tune as far as its ranks allow."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_family import CONFIG, base_state, fine_tune, write_model
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from merge_ops.engine import merge_model
from merge_ops.errors import ExtractionError, IncompatibleModelsError, OutputExistsError
from merge_ops.lora_extract import IN_EXTRACTED, NOT_LINEAR, OUTSIDE, extract_lora
from merge_ops.low_rank import tail_errors
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import parse_recipe
from mergeflow.cli import app

peft = pytest.importorskip("peft")

LOW_RANK = {"self_attn.q_proj": 2, "mlp.up_proj": 3, "self_attn.k_proj": 1}
"""Module -> rank of the known update in the low-rank fine-tune (q_proj in every layer, the others in layer 1 and 2)."""


def merged_by_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def low_rank(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The base plus known low-rank updates (``LOW_RANK``), nothing else changed; returns the folder and the updates."""
    state = load_file(family["base"] / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    updates = {}
    for layer in range(CONFIG["num_hidden_layers"]):
        for module, rank in LOW_RANK.items():
            if module == "self_attn.q_proj" or layer == {"mlp.up_proj": 1, "self_attn.k_proj": 2}[module]:
                name = f"model.layers.{layer}.{module}.weight"
                out, inner = state[name].shape
                updates[name] = 0.1 * torch.randn(out, rank, generator=g) @ torch.randn(rank, inner, generator=g)
                state[name] = state[name] + updates[name]
    return write_model(tmp_path_factory.mktemp("low_rank") / "model", state), updates


def test_full_rank_reconstructs_the_fine_tune_with_peft(family: dict[str, Path], tmp_path: Path) -> None:
    report = extract_lora(family["ft_a"], family["base"], tmp_path / "adapter", rank=16)
    fine, base = tensors(family["ft_a"]), tensors(family["base"])
    merged = merged_by_peft(family["base"], tmp_path / "adapter")
    assert len(report.modules) == 7 * CONFIG["num_hidden_layers"] and {m.rank for m in report.modules} == {16}
    for m in report.modules:
        close(merged[f"{m.module}.weight"], fine[f"{m.module}.weight"])
        assert m.error < 1e-5
    assert report.overall_error < 1e-5
    # the norms, embeddings and lm_head changed too: reported, with their relative change, not silently lost
    lost = {t.tensor: t for t in report.not_captured}
    assert set(lost) == {n for n in fine if n.endswith("norm.weight")} | {"model.embed_tokens.weight", "lm_head.weight"}
    assert lost["lm_head.weight"].reason == OUTSIDE and lost["model.norm.weight"].reason == NOT_LINEAR
    d = fine["model.norm.weight"] - base["model.norm.weight"]
    assert lost["model.norm.weight"].relative_change == pytest.approx(float(d.norm() / base["model.norm.weight"].norm()), rel=1e-5)
    lost_energy = sum(t.norm**2 for t in lost.values())
    assert report.total_error == pytest.approx(math.sqrt(lost_energy / (lost_energy + sum(m.norm**2 for m in report.modules))), rel=1e-4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16 and config["rank_pattern"] == {} and config["base_model_name_or_path"] == str(family["base"])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None


def test_embeddings_and_modules_to_save_capture_every_tensor(family: dict[str, Path], tmp_path: Path) -> None:
    report = extract_lora(family["ft_a"], family["base"], tmp_path / "adapter", rank=16, embeddings=True, modules_to_save=True)
    assert report.not_captured == [] and report.total_error < 1e-5
    assert {m.module: m.kind for m in report.modules}["model.embed_tokens"] == "embedding"
    assert "model.norm" in report.saved and "model.layers.0.input_layernorm" in report.saved
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.lm_head.lora_A.weight", "base_model.model.model.norm.weight"} <= names
    merged, fine = merged_by_peft(family["base"], tmp_path / "adapter"), tensors(family["ft_a"])
    assert set(fine) <= set(merged)
    for name, want in fine.items():
        close(merged[name], want)


def test_a_low_rank_fine_tune_is_recovered_and_truncation_errors_follow_the_singular_values(low_rank, family: dict[str, Path], tmp_path: Path) -> None:
    model, updates = low_rank
    exact = extract_lora(model, family["base"], tmp_path / "rank3", rank=3)
    assert {f"{m.module}.weight" for m in exact.modules} == set(updates) and exact.overall_error < 1e-5
    assert set(exact.unchanged) == set(tensors(family["base"])) - set(updates) and exact.not_captured == []
    merged, fine = merged_by_peft(family["base"], tmp_path / "rank3"), tensors(model)
    for name, want in fine.items():
        close(merged[name], want)
    two = {f"{m.module}.weight": m for m in extract_lora(model, family["base"], tmp_path / "rank2", rank=2).modules}
    one = {f"{m.module}.weight": m for m in extract_lora(model, family["base"], tmp_path / "rank1", rank=1).modules}
    for name, update in updates.items():
        predicted = tail_errors(torch.linalg.svdvals(update))
        true_rank = next(rank for module, rank in LOW_RANK.items() if f".{module}." in name)
        assert two[name].error == pytest.approx(float(predicted[2]), abs=1e-5) and (two[name].error < 1e-5) == (true_rank <= 2)
        assert one[name].error == pytest.approx(float(predicted[1]), rel=1e-4, abs=1e-6) and one[name].rank == 1
    report = extract_lora(model, family["base"], tmp_path / "rank1-again", rank=1, force=True)
    squared = sum((m.error * m.norm) ** 2 for m in report.modules) / sum(m.norm**2 for m in report.modules)
    assert report.overall_error == pytest.approx(math.sqrt(squared))


def test_max_error_picks_the_smallest_rank_per_module_and_peft_loads_the_pattern(low_rank, family: dict[str, Path], tmp_path: Path) -> None:
    model, updates = low_rank
    report = extract_lora(model, family["base"], tmp_path / "adapter", max_error=1e-4)
    want = {f"model.layers.{layer}.{module}": rank for module, rank in LOW_RANK.items() for layer in range(4) if f"model.layers.{layer}.{module}.weight" in updates}
    assert {m.module: m.rank for m in report.modules} == want and all(m.error <= 1e-4 for m in report.modules)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.1.mlp.up_proj": 3, "model.layers.2.self_attn.k_proj": 1}
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), tmp_path / "adapter")
    ranks = {name.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.shape[0] for name, p in loaded.named_parameters() if "lora_A" in name}
    assert ranks == want
    merged, fine = {n: t.detach() for n, t in loaded.merge_and_unload().state_dict().items()}, tensors(model)
    for name, value in fine.items():
        close(merged[name], value)
    # mergeflow's own BASE+ADAPTER sources read the patterns the same way
    recipe = {"merge_method": "linear", "models": [{"model": f"{family['base']}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}], "dtype": "float32"}
    merge_model(plan_merge(parse_recipe(recipe)), tmp_path / "merged")
    for name, value in tensors(tmp_path / "merged").items():
        close(value, fine[name])
    # a dense fine-tune: each module gets the smallest rank that keeps its error within budget; --max-rank caps it
    budget = extract_lora(family["ft_a"], family["base"], tmp_path / "budget", max_error=0.5)
    fine, base = tensors(family["ft_a"]), tensors(family["base"])
    for m in budget.modules:
        errors = tail_errors(torch.linalg.svdvals(fine[f"{m.module}.weight"] - base[f"{m.module}.weight"]))
        assert m.error <= 0.5 + 1e-6 and errors[m.rank - 1] > 0.5 and m.error == pytest.approx(float(errors[m.rank]), abs=1e-5)
    assert len({m.rank for m in budget.modules}) > 1
    capped = extract_lora(family["ft_a"], family["base"], tmp_path / "capped", max_error=0.5, max_rank=2)
    assert {m.rank for m in capped.modules} == {2} and all(m.error > 0.5 for m in capped.modules)


def test_same_inputs_give_the_same_bytes(low_rank, family: dict[str, Path], tmp_path: Path) -> None:
    for options in ({"rank": 4, "embeddings": True, "modules_to_save": True}, {"max_error": 0.3}):
        first = extract_lora(family["ft_a"], family["base"], tmp_path / "one", force=True, **options)  # type: ignore[arg-type]
        second = extract_lora(family["ft_a"], family["base"], tmp_path / "two", force=True, **options)  # type: ignore[arg-type]
        assert first.sha256 == second.sha256
        for file in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"], "no staging folder left behind"


def test_dtype_follows_the_model_or_the_option(sharded_bf16_family: dict[str, Path], tmp_path: Path) -> None:
    family = sharded_bf16_family
    extract_lora(family["ft_a"], family["base"], tmp_path / "bf16", rank=4)
    extract_lora(family["ft_a"], family["base"], tmp_path / "f32", rank=4, dtype="float32")
    for folder, dtype in (("bf16", "BF16"), ("f32", "F32")):
        with safe_open(tmp_path / folder / "adapter_model.safetensors", framework="pt") as handle:
            assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {dtype}
    merged_by_peft(family["base"], tmp_path / "bf16")  # loads


def test_what_peft_cannot_store_is_reported(tmp_path: Path) -> None:
    """Attention biases belong to the extracted projections: PEFT can neither adapt nor store them, so they are reported."""
    config = dict(CONFIG, attention_bias=True)
    base = base_state(config=config)
    write_model(tmp_path / "base", base, config=config)
    write_model(tmp_path / "tuned", fine_tune(base, 1), config=config)
    report = extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "adapter", rank=2, embeddings=True, modules_to_save=True)
    reasons = {t.tensor: t.reason for t in report.not_captured}
    assert reasons == {f"model.layers.{i}.self_attn.{p}.bias": IN_EXTRACTED for i in range(4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    captured = {f"{m.module}.weight" for m in report.modules} | {n for n in base if n.rsplit(".", 1)[0] in report.saved}
    assert captured | set(reasons) | set(report.unchanged) == set(base)


def test_gpt2_conv1d_projections_round_trip_through_peft(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "base")
    state = tensors(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    write_model(tmp_path / "tuned", {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in state.items()})
    (tmp_path / "tuned" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    report = extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "adapter", rank=16)
    assert {m.kind for m in report.modules} == {"conv1d"} and report.overall_error < 1e-5
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").merge_and_unload()
    merged, fine = model.state_dict(), tensors(tmp_path / "tuned")
    for m in report.modules:
        close(merged[f"{m.module}.weight"], fine[f"{m.module}.weight"])


def test_errors_say_what_is_wrong(family: dict[str, Path], tmp_path: Path) -> None:
    ft, base = family["ft_a"], family["base"]
    for options, message in (
        ({}, "exactly one of rank"), ({"rank": 2, "max_error": 0.1}, "exactly one of rank"), ({"rank": 0}, "rank must be >= 1"),
        ({"max_error": 1.0}, r"max_error must be in \[0, 1\)"), ({"rank": 2, "max_rank": 4}, "max_rank caps"), ({"rank": 2, "dtype": "int8"}, "dtype must be one of"),
    ):
        with pytest.raises(ExtractionError, match=message):
            extract_lora(ft, base, tmp_path / "out", **options)  # type: ignore[arg-type]
    with pytest.raises(ExtractionError, match="nothing to extract"):
        extract_lora(base, base, tmp_path / "out", rank=2)
    wide = dict(CONFIG, hidden_size=32)
    write_model(tmp_path / "wide", base_state(config=wide), config=wide)
    with pytest.raises(IncompatibleModelsError, match="hidden_size is 32") as caught:
        extract_lora(tmp_path / "wide", base, tmp_path / "out", rank=2)
    assert "does not line up with its base" in str(caught.value) and any("other shapes" in m for m in caught.value.mismatches)
    headless = {n: t for n, t in tensors(ft).items() if n != "lm_head.weight"}
    write_model(tmp_path / "headless", headless)
    with pytest.raises(IncompatibleModelsError, match="lacks 1 tensor.*lm_head.weight"):
        extract_lora(tmp_path / "headless", base, tmp_path / "out", rank=2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        extract_lora(ft, base, tmp_path / "taken", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["headless", "taken", "wide"]


def test_cli(low_rank, family: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    model, base = str(low_rank[0]), str(family["base"])
    result = runner.invoke(app, ["extract-lora", model, base, str(tmp_path / "adapter"), "--max-error", "0.01", "--show", "3"])
    assert result.exit_code == 0, result.output
    assert "the 3 worst of 6 modules" in result.output and "overall relative error" in result.output and "peak RSS" in result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again = runner.invoke(app, ["extract-lora", model, base, str(tmp_path / "adapter"), "--rank", "1"])
    assert again.exit_code == 1 and "already exists" in again.output
    forced = runner.invoke(app, ["extract-lora", str(family["ft_a"]), base, str(tmp_path / "adapter"), "--rank", "1", "--force"])
    assert forced.exit_code == 0 and "28 modules, rank 1" in forced.output and "not captured" in forced.output and "--embeddings extracts" in forced.output
    for args, message in ((["--rank", "2", "--max-error", "0.1"], "exactly one of"), ([], "exactly one of"), (["--max-error", "1.5"], "not in [0, 1)"),
                          (["--rank", "2", "--max-rank", "3"], "--max-rank caps")):
        bad = runner.invoke(app, ["extract-lora", model, base, str(tmp_path / "other"), *args])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
    mismatch = runner.invoke(app, ["extract-lora", model, str(tmp_path / "adapter"), str(tmp_path / "other"), "--rank", "2"])
    assert mismatch.exit_code == 1 and "config.json" in mismatch.output
