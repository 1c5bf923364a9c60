"""The merge engine end to end on tiny Llama families: plans, shards, outputs, determinism, errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from method_cases import NAMES, call_kwargs, model_count, names_where, recipe_for, uses_base
from safetensors import safe_open
from safetensors.torch import load_file, save
from tiny_family import CONFIG, base_state, write_model
from transformers import AutoModelForCausalLM

from merge_ops.engine import finalize, merge_model, merge_shard
from merge_ops.errors import IncompatibleModelsError, ModelNotFoundError, OutputExistsError, RecipeError
from merge_ops.plan import MergePlan, plan_merge
from merge_ops.recipe_file import parse_recipe
from merge_ops.safetensors_io import StreamingSafetensorsWriter


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def merge(recipe: dict, out: Path, **plan_kwargs: object) -> MergePlan:
    plan = plan_merge(parse_recipe(recipe), **plan_kwargs)
    merge_model(plan, out)
    return plan


def ties_recipe(family: dict[str, Path], **extra: object) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k]), "parameters": {"weight": w, "density": 0.5}} for k, w in (("ft_a", 0.6), ("ft_b", 0.4), ("ft_neg", 0.3))],
        **extra,
    }


def test_linear_weight_one_returns_source_exactly(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": str(family["ft_a"]), "parameters": {"weight": 1.0}}, {"model": str(family["ft_b"]), "parameters": {"weight": 0.0}}]}
    merge(recipe, tmp_path / "out")
    merged, source = load_all(tmp_path / "out"), load_all(family["ft_a"])
    assert merged.keys() == source.keys()
    assert all(torch.equal(merged[k], source[k]) for k in source)


def test_task_arithmetic_matches_hand_formula(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft_a"]), "parameters": {"weight": 0.7}}, {"model": str(family["ft_neg"]), "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.9},
    }
    merge(recipe, tmp_path / "out")
    base, a, neg = (load_all(family[k]) for k in ("base", "ft_a", "ft_neg"))
    merged = load_all(tmp_path / "out")
    for name in base:
        expected = base[name] + 0.9 * (0.7 * (a[name] - base[name]) + 0.5 * (neg[name] - base[name]))
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_gradient_and_filter_parameters_reach_each_layer(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["base"])}, {"model": str(family["ft_a"])}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.0}]},
    }
    plan = merge(recipe, tmp_path / "out")
    jobs = {t.name: t for s in plan.shards for t in s.tensors}
    # 4 layers: t = idx/3 for attention tensors, 0 for everything else
    assert jobs["model.layers.0.self_attn.q_proj.weight"].params["t"] == 0.0
    assert jobs["model.layers.1.self_attn.q_proj.weight"].params["t"] == pytest.approx(1 / 3)
    assert jobs["model.layers.3.self_attn.q_proj.weight"].params["t"] == 1.0
    assert jobs["model.layers.3.mlp.up_proj.weight"].params["t"] == 0.0
    merged, base, a = load_all(tmp_path / "out"), load_all(family["base"]), load_all(family["ft_a"])
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.3.self_attn.q_proj.weight"], a["model.layers.3.self_attn.q_proj.weight"], rtol=0, atol=1e-6)


def test_passthrough_slices_stack_and_renumber_layers(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(family["ft_a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(family["ft_b"]), "layer_range": [1, 4]}]},
        ],
    }
    plan = merge(recipe, tmp_path / "out")
    merged, a, b = load_all(tmp_path / "out"), load_all(family["ft_a"]), load_all(family["ft_b"])
    assert plan.num_layers == 6
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    suffix = "mlp.down_proj.weight"
    for out_layer, (source, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"], source[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6


def test_sharded_bf16_output_loads_and_generates(sharded_bf16_family: dict[str, Path], tmp_path: Path) -> None:
    plan = merge(ties_recipe(sharded_bf16_family, dtype="bfloat16"), tmp_path / "out", shard_size=20_000)
    out = tmp_path / "out"
    assert len(plan.shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.file for s in plan.shards}
    assert index["metadata"]["total_size"] == sum((out / s.file).stat().st_size - _header_size(out / s.file) for s in plan.shards)
    assert all(s.nbytes <= 20_000 or len(s.tensors) == 1 for s in plan.shards)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert (out / "generation_config.json").exists() and (out / "tokenizer_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    generated = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def _header_size(file: Path) -> int:
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_model_card_has_hub_metadata_and_recipe(family: dict[str, Path], tmp_path: Path) -> None:
    merge(ties_recipe(family), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: transformers" in meta and "- merge\n" in meta and "- mergeflow\n" in meta
    # local folders are no Hub ids: named in the body, not in base_model
    assert "base_model" not in meta and str(family["ft_neg"]) not in meta
    assert f"- `{family['ft_neg']}` (local folder)" in card
    assert "merge_method: ties" in card


@pytest.mark.parametrize("method", NAMES)
def test_reruns_are_byte_identical_whatever_the_shard_order(method: str, sharded_bf16_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = recipe_for(method, sharded_bf16_family, dtype="bfloat16", seed=7)  # from the declaration: density 0.5 where declared
    first = merge(recipe, tmp_path / "first", shard_size=20_000)
    # second run: a fresh plan, shards written in reverse order, then finalized
    second = plan_merge(parse_recipe(recipe), shard_size=20_000)
    (tmp_path / "second").mkdir()
    for i in reversed(range(len(second.shards))):
        merge_shard(second, i, tmp_path / "second")
    finalize(second, tmp_path / "second")
    assert first.model_dump() == second.model_dump()
    assert file_hashes(tmp_path / "first") == file_hashes(tmp_path / "second")


def test_plan_roundtrips_through_json(family: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_merge(parse_recipe(ties_recipe(family)))
    restored = MergePlan.model_validate_json(plan.model_dump_json())
    sha = merge_shard(restored, 0, tmp_path)
    assert sha == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()


def test_random_methods_depend_on_seed(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = ties_recipe(family, merge_method="dare_ties")
    a = merge(recipe, tmp_path / "a")
    b = merge({**recipe, "seed": 1}, tmp_path / "b")
    assert a.shards[0].tensors[0].seed != b.shards[0].tensors[0].seed
    assert file_hashes(tmp_path / "a")["model.safetensors"] != file_hashes(tmp_path / "b")["model.safetensors"]


def test_mixed_input_dtypes_are_merged_in_float32(family: dict[str, Path], tmp_path: Path) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in load_all(family["ft_a"]).items()}
    bf16_copy = write_model(tmp_path / "ft_a_bf16", state)
    recipe = {"merge_method": "linear", "models": [{"model": str(bf16_copy), "parameters": {"weight": 1.0}}, {"model": str(family["ft_b"]), "parameters": {"weight": 1.0}}], "out_dtype": "float32"}
    merge(recipe, tmp_path / "out")
    merged, b = load_all(tmp_path / "out"), load_all(family["ft_b"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == torch.float32
    torch.testing.assert_close(merged[name], (state[name].float() + b[name]) / 2, rtol=0, atol=1e-6)


def test_existing_output_is_kept_and_no_partial_model_is_left(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        merge(ties_recipe(family), out)
    assert (out / "keep.txt").read_text() == "mine"
    cancelling = {"merge_method": "multislerp", "parameters": {"normalize_weights": False}, "models": [{"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft_a", "ft_a", "ft_a")]}
    cancelling["models"][2]["parameters"]["weight"] = -2.0  # the weighted directions cancel: fails while merging
    with pytest.raises(ValueError, match="cancel out"):
        merge(cancelling, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ties_density_keeps_at_least_one_entry_and_zero_keeps_none(family: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's TIES trim keeps ``max(1, int(density * n))`` entries; density 0 drops the model's delta."""
    recipe = ties_recipe(family)
    recipe["models"] = recipe["models"][:1]
    recipe["models"][0]["parameters"]["density"] = 0.0001
    merge(recipe, tmp_path / "one")
    base, merged = load_file(family["base"] / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    ft = load_file(family["ft_a"] / "model.safetensors")
    for name, tensor in merged.items():
        changed = tensor != base[name]
        assert int(changed.sum()) == 1, name
        top = (ft[name] - base[name]).abs().flatten().argmax()
        assert changed.flatten()[top], name
    recipe["models"][0]["parameters"]["density"] = 0.0
    merge(recipe, tmp_path / "none")
    assert all(torch.equal(t, base[n]) for n, t in load_file(tmp_path / "none" / "model.safetensors").items())


def test_a_failed_write_drops_the_partial_shard(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_merge(parse_recipe(ties_recipe(family)), shard_size=10**9)
    real_write = StreamingSafetensorsWriter.write
    calls = []

    def fail_third(self: StreamingSafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", fail_third)
    with pytest.raises(OSError, match="No space left"):
        merge_shard(plan, 0, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its .partial file


def test_missing_model_and_incompatible_shapes_are_clear_errors(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a local model folder"):
        plan_merge(parse_recipe({**ties_recipe(family), "base_model": str(tmp_path / "nowhere")}))
    wider = dict(CONFIG, intermediate_size=48)
    other = write_model(tmp_path / "wider", base_state(config=wider), config=wider)
    recipe = ties_recipe(family)
    recipe["models"][1]["model"] = str(other)
    with pytest.raises(IncompatibleModelsError) as err:
        plan_merge(parse_recipe(recipe))
    assert f"{other}: intermediate_size is 48" in str(err.value)  # the config key that explains the shapes, first
    shapes = next(m for m in err.value.mismatches if "other shapes" in m)  # then every tensor it changes: up, gate, down per layer
    assert f"{3 * CONFIG['num_hidden_layers']} tensor(s) have other shapes" in shapes and "mlp.up_proj.weight [48, 16] vs [32, 16]" in shapes


def test_filters_without_fallback_are_reported(family: dict[str, Path]) -> None:
    recipe = ties_recipe(family)
    recipe["models"][0]["parameters"]["weight"] = [{"filter": "self_attn", "value": 1.0}]
    with pytest.raises(RecipeError, match="no value of weight applies"):
        plan_merge(parse_recipe(recipe))


def test_streaming_writer_matches_reference_bytes(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "c": torch.zeros(1), "b": torch.ones(3, dtype=torch.bfloat16)}
    names = ["a.weight", "c", "b"]  # the reference writer's order: by alignment, then name
    specs = [(n, {torch.float32: "F32", torch.bfloat16: "BF16"}[tensors[n].dtype], tuple(tensors[n].shape)) for n in names]
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs) as writer:
        for n in names:
            writer.write(n, tensors[n])
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})
    assert writer.sha256 == hashlib.sha256(save(tensors, metadata={"format": "pt"})).hexdigest()
    with safe_open(tmp_path / "x.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_streaming_writer_refuses_wrong_tensors_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="should be"):
        with StreamingSafetensorsWriter(target, [("w", "F32", (2,))]) as writer:
            writer.write("w", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", names_where(lambda m: m.elementwise))
def test_row_blocks_give_the_same_bytes_as_whole_tensors(method: str, family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merge_ops.engine as engine

    recipe = recipe_for(method, family)
    plan = plan_merge(parse_recipe(recipe))
    assert engine.split_into_pieces(plan, 0) == [engine.Piece(t) for t in plan.shards[0].tensors]
    (tmp_path / "whole").mkdir()
    whole = merge_shard(plan, 0, tmp_path / "whole")
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 100)
    pieces = engine.split_into_pieces(plan, 0)
    assert len(pieces) > plan.tensor_count and any(p.rows and p.rows[1] - p.rows[0] < p.job.shape[0] for p in pieces)
    seen: list[engine.Piece] = []
    (tmp_path / "blocks").mkdir()
    blocks = merge_shard(plan, 0, tmp_path / "blocks", progress=seen.append)
    assert blocks == whole
    assert sum(p.nbytes for p in seen) == plan.total_size
    assert sum(p.completes_tensor for p in seen) == plan.tensor_count


def test_tokenizer_source_choice_and_union(family: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "ft_b_own_vocab"
    shutil.copytree(family["ft_b"], other)
    (other / "tokenizer.json").write_text('{"model": {"vocab": {"x": 0}}}')
    recipe = ties_recipe(family)
    recipe["models"][1]["model"] = str(other)
    merge({**recipe, "tokenizer_source": str(other)}, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()
    # the base has no tokenizer to build a union from and the rows agree: its files are copied, as before
    assert plan_merge(parse_recipe({**recipe, "tokenizer_source": "union"})).tokenizer_build is None
    assert plan_merge(parse_recipe({**ties_recipe(family), "tokenizer_source": "union"})).tokenizer_build is None  # same vocabularies


@pytest.mark.parametrize("method", names_where(lambda m: m.upcasts))
def test_methods_that_upcast_blockwise_equal_upcasting_first(method: str) -> None:
    from merge_ops.methods.registry import METHODS

    m = METHODS[method]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.1 * torch.randn(64, 48, generator=g)).to(torch.bfloat16) for _ in range(model_count(method))]
    base_or_none = base if uses_base(method) else None

    def params() -> dict:  # a fresh generator each time for random methods
        return call_kwargs(method, len(xs), seed=1, sparse=True, normalize=False, rescale=True)

    lazy = m(xs, base_or_none, dtype=torch.float32, **params())
    eager = m([x.float() for x in xs], None if base_or_none is None else base.float(), **params())
    assert lazy.dtype == torch.float32 and torch.equal(lazy, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "dare_ties"])
def test_cuda_matches_cpu(method: str, family: dict[str, Path], tmp_path: Path) -> None:
    # masks are drawn on the CPU, so random methods agree too; kernels may round differently (FMA)
    recipe = ties_recipe(family, merge_method=method)
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": str(family["base"]), "models": [{"model": str(family["ft_a"])}], "parameters": {"t": 0.4}}
    plan = plan_merge(parse_recipe(recipe))
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        merge_shard(plan, 0, tmp_path / device, device=device)
    cpu, cuda = load_all(tmp_path / "cpu"), load_all(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-5, atol=1e-6)


def test_mergekit_compute_dtype_follows_mergekit_per_method(family: dict[str, Path]) -> None:
    from merge_ops.plan import resolve_compute_dtype

    def resolved(method: str, dtype: str | None) -> str:
        recipe = {**ties_recipe(family), "merge_method": method, "dtype": dtype}
        if method == "linear":
            del recipe["base_model"]  # linear would merge it as one more model, without a weight
        return resolve_compute_dtype("mergekit", parse_recipe(recipe))

    assert resolved("ties", "bfloat16") == "bfloat16"
    assert resolved("task_arithmetic", None) == "float32"
    assert resolved("linear", "bfloat16") == "float32"
    plan = plan_merge(parse_recipe({**ties_recipe(family), "dtype": "bfloat16"}), compute_dtype="mergekit")
    assert plan.compute_dtype == "bfloat16"


def test_an_unlisted_base_model_is_one_more_input_of_a_method_without_base(family: dict[str, Path], tmp_path: Path) -> None:
    """As in mergekit 0.1.5: ``linear`` with ``base_model`` averages the base too; it needs a weight for it."""
    recipe = {"merge_method": "linear", "base_model": str(family["base"]), "parameters": {"weight": 1.0},
              "models": [{"model": str(family[k])} for k in ("ft_a", "ft_b")]}
    merge(recipe, tmp_path / "mean")
    inputs = [load_file(family[k] / "model.safetensors") for k in ("ft_a", "ft_b", "base")]
    for name, tensor in load_file(tmp_path / "mean" / "model.safetensors").items():
        expected = (inputs[0][name] * 1.0 + inputs[1][name] * 1.0 + inputs[2][name] * 1.0) / 3.0
        assert torch.equal(tensor, expected), name
    del recipe["parameters"]
    recipe["models"] = [{"model": str(family[k]), "parameters": {"weight": 0.5}} for k in ("ft_a", "ft_b")]
    with pytest.raises(RecipeError, match="weight"):
        merge(recipe, tmp_path / "never")
