"""A merge never exits 0 with a broken model: non-finite or zero-sum weights, slices of other shapes, other architectures,
NaN/Inf in the sources or the output, numeric options out of range. Each case: the exit code or exception, the one-line
message, the inputs unchanged and no OUT written."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_family import CONFIG, base_state, make_adapter, write_model
from typer.testing import CliRunner

import flows.merge_pipeline  # noqa: F401  (Prefect sets up its log handlers on import: with the real stderr, not CliRunner's)
import merge_ops.engine
from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError, NonFiniteError, RecipeError
from merge_ops.finite import nonfinite_count
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from mergeflow.cli import app, console_errors

runner = CliRunner()
WIDE = {**CONFIG, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}
"""A tiny Llama twice as wide as the family."""


@pytest.fixture(autouse=True)
def wide_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """One error line stays one line in the captured output."""
    monkeypatch.setattr(console_errors.console, "width", 1000)


@pytest.fixture(scope="module")
def models(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the tiny family that the cases below may break (the shared one stays intact whatever they do)."""
    root = tmp_path_factory.mktemp("guarded")
    return {k: Path(shutil.copytree(family[k], root / k)) for k in ("base", "ft_a", "ft_b")}


def tree_hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def unchanged(models: dict[str, Path]) -> Iterator[None]:
    """Every model folder holds the same bytes after the case."""
    before = tree_hashes(*models.values())
    yield
    assert tree_hashes(*models.values()) == before


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def cli(*args: str | Path, raw: bool = False) -> tuple[int, str]:
    """Exit code and the output as one line (``raw``: as printed)."""
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})  # usage errors on one line, too
    return result.exit_code, result.output if raw else " ".join(result.output.split())


def refused_merge(recipe: Path, out: Path, *extra: str) -> str:
    """`mergeflow merge` of ``recipe`` fails with exit 1, the error at the end (after any progress bar), no OUT, the recipe's
    folder unchanged; the error as one line."""
    before = tree_hashes(recipe.parent)
    code, output = cli("merge", recipe, out, "--shard-size", "20KB", *extra, raw=True)
    assert code == 1, output
    assert output.count("error:") == 1 and "Traceback" not in output
    assert not out.exists() and tree_hashes(recipe.parent) == before
    return " ".join(output[output.index("error:"):].split())


def linear(models: dict[str, Path], weight_a: str, weight_b: str = "0.5", extra: str = "") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {models['ft_a']}\n    parameters: {{weight: {weight_a}}}\n"
            f"  - model: {models['ft_b']}\n    parameters: {{weight: {weight_b}}}\n{extra}")


# -- a. weights and parameters must be finite, normalizers non-zero ---------------------------------------------------


@pytest.mark.parametrize(("weight", "shown"), [(".nan", "nan"), ("1e400", "'1e400'"), ("1.0e+400", "inf"), ("-.inf", "-inf"), ("[0.2, .inf]", "inf"),
                                               ("[{filter: mlp, value: .nan}, {value: 0.5}]", "nan")])
def test_non_finite_weight_is_a_recipe_error(models: dict[str, Path], tmp_path: Path, unchanged: None, weight: str, shown: str) -> None:
    message = refused_merge(write_recipe(tmp_path, linear(models, weight)), tmp_path / "out")
    assert f"models[0].parameters.weight: {shown} is not allowed for weight" in message and "Input should be a finite number" in message


@pytest.mark.parametrize(("where", "text"), [
    ("parameters.lambda", "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft_a}\n    parameters: {{weight: 1}}\nparameters: {{lambda: .inf}}\n"),
    ("slices[0].parameters.scale", "merge_method: passthrough\nslices:\n  - sources: [{{model: {ft_a}, layer_range: [0, 4]}}]\n    parameters: {{scale: -.inf}}\n"),
    ("slices[0].sources[0].parameters.scale", "merge_method: passthrough\nslices:\n  - sources: [{{model: {ft_a}, layer_range: [0, 4], parameters: {{scale: .nan}}}}]\n"),
    ("parameters.t", "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft_a}\nparameters: {{t: [0, .nan]}}\n"),
])
def test_non_finite_parameter_anywhere_is_a_recipe_error(models: dict[str, Path], tmp_path: Path, unchanged: None, where: str, text: str) -> None:
    message = refused_merge(write_recipe(tmp_path, text.format(**models)), tmp_path / "out")
    assert f"{where}: " in message and "Input should be a finite number" in message


def test_non_finite_adapter_weight_is_a_recipe_error(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"merge_method: linear\noutput: adapter\nmodels:\n  - model: {models['base']}+adapter\n    parameters: {{weight: .inf}}\n")
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: inf -> a finite number"):
        load_recipe(recipe)


def test_weights_summing_to_zero_with_normalize_are_refused_at_plan_time(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    message = refused_merge(write_recipe(tmp_path, linear(models, "0.5", "-0.5")), tmp_path / "out")
    assert "weight: 0.5, -0.5 sum to zero for 39 tensor(s) (model.embed_tokens.weight" in message
    assert "linear divides by their sum while `normalize` is true; change the weights, or set `normalize: false`" in message
    code, output = cli("plan", tmp_path / "recipe.yaml")
    assert code == 1 and "sum to zero" in output


def test_gradient_weights_summing_to_zero_in_one_layer_are_refused(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    message = refused_merge(write_recipe(tmp_path, linear(models, "[1, 0.5]", "[0, -0.5]")), tmp_path / "out")
    assert "weight: 0.5, -0.5 sum to zero for 9 tensor(s) (model.layers.3.input_layernorm.weight" in message


def test_multislerp_weights_summing_to_zero_are_refused(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    text = linear(models, "1", "-1").replace("merge_method: linear", "merge_method: multislerp")
    assert "while `normalize_weights` is true" in refused_merge(write_recipe(tmp_path, text), tmp_path / "out")


def test_weights_summing_to_zero_without_normalize_merge(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, linear(models, "0.5", "-0.5", "parameters: {normalize: false}\n"))
    code, output = cli("merge", recipe, tmp_path / "out", "--shard-size", "20KB")
    assert code == 0, output
    assert list((tmp_path / "out").glob("*.safetensors"))


# -- e. numeric options are checked before anything runs ----------------------------------------------------------------


@pytest.mark.parametrize(("command", "option", "value", "message"), [
    ("merge", "--shard-size", "-5MB", "'-5MB' is not a size of at least one byte"),
    ("merge", "--shard-size", "0", "'0' is not a size of at least one byte"),
    ("merge", "--shard-size", "abc", "'abc' is not a size; write e.g. 5GB"),
    ("merge", "--shard-size", "infGB", "'infGB' is not a size of at least one byte"),
    ("merge", "--threads", "0", "greater than or equal to 1"),
    ("merge", "--threads", "-1", "greater than or equal to 1"),
    ("plan", "--shard-size", "0.5B", "'0.5B' is not a size of at least one byte"),
    ("run", "--shard-size", "-1GB", "'-1GB' is not a size of at least one byte"),
    ("run", "--workers", "0", "greater than or equal to 1"),
    ("run", "--dask-workers", "-2", "greater than or equal to 0"),
    ("sweep", "--workers", "-1", "greater than or equal to 1"),
    ("extract-lora", "--show", "0", "greater than or equal to 1"),
    ("extract-lora", "--rank", "0", "greater than or equal to 1"),
])
def test_numeric_option_out_of_range_is_a_usage_error(models: dict[str, Path], tmp_path: Path, unchanged: None,
                                                      command: str, option: str, value: str, message: str) -> None:
    recipe = write_recipe(tmp_path, linear(models, "0.5"))
    out = tmp_path / "out"
    args: list[str | Path] = {"plan": [recipe], "sweep": [recipe, "--grid", "weight=0.3,0.6", "--out", out],
                              "extract-lora": [models["ft_a"], models["base"], out, "--rank", "2"]}.get(command, [recipe, out])
    before = tree_hashes(tmp_path)
    code, output = cli(command, *args, option, value)
    assert code == 2, output
    assert f"Invalid value for '{option}'" in output and message in output
    assert not out.exists() and tree_hashes(tmp_path) == before


def test_max_error_nan_is_a_usage_error(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    code, output = cli("extract-lora", models["ft_a"], models["base"], tmp_path / "out", "--max-error", "nan")
    assert code == 2 and "Invalid value for --max-error: nan is not in [0, 1)" in output and not (tmp_path / "out").exists()


def test_sweep_grid_of_non_finite_values_is_refused_before_merging(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    recipe = write_recipe(tmp_path, linear(models, "0.5"))
    before = tree_hashes(tmp_path)
    code, output = cli("sweep", recipe, "--grid", "weight=nan,0.5", "--out", tmp_path / "sweep")
    assert code == 1 and "linear-weight_nan: parameters.weight: nan is not allowed for weight" in output and "finite number" in output
    assert not (tmp_path / "sweep").exists() and tree_hashes(tmp_path) == before


# -- d. NaN and infinity in the sources or the output: an error unless --allow-nonfinite ----------------------------------


@pytest.fixture(scope="module")
def poisoned(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ft_b with two NaN and one -inf in a layer's q_proj."""
    state = load_file(models["ft_b"] / "model.safetensors")
    flat = state[POISONED].view(-1)
    flat[3], flat[40], flat[77] = float("nan"), float("-inf"), float("nan")
    return write_model(tmp_path_factory.mktemp("poisoned") / "ft_nan", state)


POISONED = "model.layers.2.self_attn.q_proj.weight"


def test_nan_in_a_source_is_an_error_naming_model_tensor_and_count(models: dict[str, Path], poisoned: Path, tmp_path: Path, unchanged: None) -> None:
    before = tree_hashes(poisoned)
    message = refused_merge(write_recipe(tmp_path, linear({**models, "ft_b": poisoned}, "0.5")), tmp_path / "out")
    assert f"{poisoned}: tensor {POISONED} holds 3 NaN or infinite value(s), which the merged model would carry" in message
    assert "pass --allow-nonfinite to merge it anyway" in message
    assert tree_hashes(poisoned) == before
    assert not list(tmp_path.glob(".*"))  # no staging folder left


def test_allow_nonfinite_merges_a_source_with_nan(models: dict[str, Path], poisoned: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, linear({**models, "ft_b": poisoned}, "0.5"))
    code, output = cli("merge", recipe, tmp_path / "out", "--allow-nonfinite")
    assert code == 0, output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert int((~torch.isfinite(merged[POISONED])).sum()) == 3 and bool(torch.isfinite(merged["model.embed_tokens.weight"]).all())


def test_output_overflowing_its_dtype_is_an_error(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    text = linear(models, "1e6", "1e6", "parameters: {normalize: false}\ndtype: float16\n")
    message = refused_merge(write_recipe(tmp_path, text), tmp_path / "out")
    assert "error: merged tensor model.embed_tokens.weight would hold" in message and "NaN or infinite value(s) from finite inputs" in message
    assert "pass --allow-nonfinite to write it anyway" in message
    code, output = cli("merge", tmp_path / "recipe.yaml", tmp_path / "out", "--allow-nonfinite")
    assert code == 0, output


def test_engine_checks_row_blocks_and_names_the_rows(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = load_file(models["ft_a"] / "model.safetensors")
    state["model.embed_tokens.weight"][50, 5] = float("inf")
    source = write_model(tmp_path / "ft_inf", state)
    monkeypatch.setattr(merge_ops.engine, "BLOCK_ELEMENTS", 16 * 16)  # 16 rows of the embedding per block
    plan = plan_merge(load_recipe(write_recipe(tmp_path, linear({**models, "ft_a": source}, "0.5"))))
    with pytest.raises(NonFiniteError, match=r"tensor model.embed_tokens.weight holds 1 NaN or infinite value\(s\) in rows 48-63") as caught:
        merge_model(plan, tmp_path / "out")
    assert caught.value.model == str(source) and caught.value.count == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_count(dtype: torch.dtype) -> None:
    values = torch.randn(1000).to(dtype)
    assert nonfinite_count(values) == 0 and nonfinite_count(torch.arange(5)) == 0 and nonfinite_count(values[:0]) == 0
    values[[0, 500, 999]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    assert nonfinite_count(values) == 3 and nonfinite_count(values.view(10, 100)[4:6]) == 1


# -- c. another architecture or model_type: an error in merge as in check, unless --allow-crimes --------------------------


@pytest.fixture(scope="module")
def mistral(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ft_b's weights labelled as a Mistral model."""
    folder = Path(shutil.copytree(models["ft_b"], tmp_path_factory.mktemp("crimes") / "ft_mistral"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    return folder


def test_other_architecture_is_an_error_unless_allow_crimes(models: dict[str, Path], mistral: Path, tmp_path: Path, unchanged: None) -> None:
    before = tree_hashes(mistral)
    recipe = write_recipe(tmp_path, linear({**models, "ft_b": mistral}, "0.5"))
    message = refused_merge(recipe, tmp_path / "out")
    assert (f"{mistral}: architectures is ['MistralForCausalLM'], the reference {models['ft_a']} has ['LlamaForCausalLM']; merge models of one "
            "architecture, or pass --allow-crimes to merge them anyway") in message
    assert f"{mistral}: model_type is 'mistral', the reference {models['ft_a']} has 'llama'" in message
    code, output = cli("plan", recipe)
    assert code == 1 and "--allow-crimes" in output
    code, output = cli("merge", recipe, tmp_path / "out", "--allow-crimes")
    assert code == 0, output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert tree_hashes(mistral) == before


def test_allow_crimes_does_not_allow_other_shapes(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    wide = write_model(tmp_path / "wide", base_state(config=WIDE), config=WIDE)
    recipe = load_recipe(write_recipe(tmp_path, linear({**models, "ft_b": wide}, "0.5")))
    with pytest.raises(IncompatibleModelsError, match=r"hidden_size is 32, the reference .* has 16") as caught:
        plan_merge(recipe, allow_crimes=True)
    assert not any("allow-crimes" in m for m in caught.value.mismatches)


# -- b. slices must agree on shapes ------------------------------------------------------------------------------------------


def frankenmerge(first: Path, second: Path) -> str:
    return (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {first}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {second}, layer_range: [2, 4]}}]\n")


def test_slices_of_models_of_other_hidden_sizes_are_refused(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    wide = write_model(tmp_path / "wide", base_state(config=WIDE), config=WIDE)
    message = refused_merge(write_recipe(tmp_path, frankenmerge(models["base"], wide)), tmp_path / "out")
    assert f"{wide}: hidden_size is 32, the reference {models['base']} has 16" in message
    assert (f"{wide}: slices[1]: 18 layer tensor(s) have other shapes than the layers of {models['base']}, whose config the merged model takes, so it "
            "would not load: layers.2.input_layernorm.weight [32] vs [16]") in message


def test_slices_whose_layers_differ_behind_the_same_config_are_refused_at_plan_time(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    lying = write_model(tmp_path / "mlp48", base_state(config={**CONFIG, "intermediate_size": 48}), config=CONFIG)  # config says 32
    recipe = load_recipe(write_recipe(tmp_path, frankenmerge(models["base"], lying)))
    with pytest.raises(IncompatibleModelsError, match=r"1 mismatch") as caught:
        plan_merge(recipe, allow_crimes=True)
    assert caught.value.mismatches == [
        f"{lying}: slices[1]: 6 layer tensor(s) have other shapes than the layers of {models['base']}, whose config the merged model takes, so it would "
        "not load: layers.2.mlp.down_proj.weight [16, 48] vs [16, 32], layers.2.mlp.gate_proj.weight [48, 16] vs [32, 16], layers.2.mlp.up_proj.weight "
        "[48, 16] vs [32, 16], layers.3.mlp.down_proj.weight [16, 48] vs [16, 32], layers.3.mlp.gate_proj.weight [48, 16] vs [32, 16], and 1 more; "
        "stack layers of models of one shape"]


def test_slices_of_one_shape_from_two_models_merge(models: dict[str, Path], tmp_path: Path) -> None:
    code, output = cli("merge", write_recipe(tmp_path, frankenmerge(models["ft_a"], models["ft_b"])), tmp_path / "out")
    assert code == 0, output


@pytest.mark.slow
def test_run_refuses_other_architectures_and_nan_unless_allowed(prefect_api: str, models: dict[str, Path], mistral: Path, poisoned: Path,
                                                                nan_adapter: tuple[Path, str], tmp_path: Path, unchanged: None) -> None:
    for name, source, flag, message in [("crimes", mistral, "--allow-crimes", "pass --allow-crimes to merge them anyway"),
                                        ("nan", poisoned, "--allow-nonfinite", f"tensor {POISONED} holds 3 NaN or infinite value(s)"),
                                        ("adapter", nan_adapter[0], "--allow-nonfinite", f"tensor {nan_adapter[1]} holds 2 NaN or infinite value(s)")]:
        (tmp_path / name).mkdir()
        text = adapter_recipe(models["base"], source) if name == "adapter" else linear({**models, "ft_b": source}, "0.5")
        recipe, out = write_recipe(tmp_path / name, text), tmp_path / f"out-{name}"
        code, output = cli("run", recipe, out, "--shard-size", "20KB")
        assert code == 1 and message in output and not out.exists(), output
        code, output = cli("run", recipe, out, "--shard-size", "20KB", flag)
        assert code == 0 and list(out.glob("*.safetensors")), output


def test_a_method_refusing_a_tensor_is_a_one_line_error(models: dict[str, Path], tmp_path: Path, unchanged: None) -> None:
    state = load_file(models["ft_a"] / "model.safetensors")  # ft_a, -ft_a and zeros: their directions sum to zero
    opposite, zeros = write_model(tmp_path / "opposite", {n: -t for n, t in state.items()}), write_model(tmp_path / "zeros", {n: 0 * t for n, t in state.items()})
    three = linear({**models, "ft_b": opposite}, "1", "1") + f"  - model: {zeros}\n    parameters: {{weight: 1}}\n"
    text = three.replace("merge_method: linear", "merge_method: multislerp")
    message = refused_merge(write_recipe(tmp_path, text), tmp_path / "out")
    assert "error: multislerp failed on tensor" in message and "the weighted directions of the models cancel out" in message


@pytest.fixture(scope="module")
def nan_adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A LoRA adapter of the base with two NaN in one lora_A factor; the adapter and that factor's name."""
    adapter = make_adapter(models["base"], tmp_path_factory.mktemp("nan_adapter") / "adapter", 7, target_modules=["q_proj", "v_proj"])
    factors = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in factors if "lora_A" in n)
    factors[name][0, :2] = float("nan")
    save_file(factors, adapter / "adapter_model.safetensors")
    return adapter, name


def adapter_recipe(base: Path, adapter: Path) -> str:
    return f"merge_method: linear\noutput: adapter\nmodels:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1.0}}\n"


def test_nan_in_an_adapter_is_an_error_unless_allowed(models: dict[str, Path], nan_adapter: tuple[Path, str], tmp_path: Path, unchanged: None) -> None:
    adapter, name = nan_adapter
    before = tree_hashes(adapter)
    message = refused_merge(write_recipe(tmp_path, adapter_recipe(models["base"], adapter)), tmp_path / "out")
    assert f"{models['base']}+{adapter}: tensor {name} holds 2 NaN or infinite value(s)" in message
    assert tree_hashes(adapter) == before
    code, output = cli("merge", tmp_path / "recipe.yaml", tmp_path / "out", "--allow-nonfinite")
    assert code == 0, output


def test_a_refused_forced_merge_keeps_the_existing_output(models: dict[str, Path], poisoned: Path, tmp_path: Path, unchanged: None) -> None:
    out = tmp_path / "out"
    code, output = cli("merge", write_recipe(tmp_path, linear(models, "0.5")), out)
    assert code == 0, output
    before = tree_hashes(out)
    write_recipe(tmp_path, linear({**models, "ft_b": poisoned}, "0.5"))
    code, output = cli("merge", tmp_path / "recipe.yaml", out, "--force")
    assert code == 1 and f"tensor {POISONED} holds 3 NaN or infinite value(s)" in output
    assert tree_hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # no staging folder left
