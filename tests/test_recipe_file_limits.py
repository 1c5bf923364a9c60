"""Recipes are read with bounds: file size, UTF-8 text, a regular file, and YAML aliases ("billion laughs")."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from merge_ops.errors import RecipeError
from merge_ops.recipe_file import MAX_RECIPE_BYTES, load_recipe
from mergeflow.cli import app

runner = CliRunner()


def billion_laughs(levels: int = 10, fan_out: int = 20) -> str:
    """A < 2 KB YAML document whose aliases expand to fan_out ** levels strings."""
    lines = ["merge_method: linear", "a0: &a0 [" + ", ".join(['"lol"'] * fan_out) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * fan_out) + "]")
    lines.append(f"models: [{{model: *a{levels - 1}}}]")
    return "\n".join(lines) + "\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(path: Path) -> str:
    started = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert time.perf_counter() - started < 1.0
    assert len(str(err.value)) < 400  # no repr() of an expanded value
    return str(err.value)


def test_billion_laughs_is_refused_in_under_a_second(tmp_path: Path) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(billion_laughs())
    assert recipe.stat().st_size <= 2048
    message = refused(recipe)
    assert "aliases expand to more than 100000 values" in message and "billion laughs" in message


def test_merge_key_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 {x: 1, y: 2}"] + [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}]}}" for i in range(1, 9)]
    recipe = tmp_path / "merge-bomb.yaml"
    recipe.write_text("\n".join(lines) + "\nmerge_method: linear\n")
    assert "aliases expand" in refused(recipe)


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("merge_method: linear\nmodels: &m [{model: x}, *m]\n")
    assert "recursive document" in refused(recipe)


def test_shared_aliases_within_the_limit_still_load(tmp_path: Path) -> None:
    recipe = tmp_path / "aliases.yaml"
    recipe.write_text("merge_method: linear\nparameters: &w {weight: 0.5}\nmodels:\n  - {model: a, parameters: *w}\n  - {model: b, parameters: *w}\n")
    loaded = load_recipe(recipe)
    assert [m.model.key for m in loaded.models] == ["a", "b"]
    assert loaded.text == recipe.read_text()


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("merge_method: linear\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    assert f"over the {MAX_RECIPE_BYTES}-byte limit" in refused(recipe)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "model.safetensors"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    message = refused(recipe)
    assert "not UTF-8 text (byte 0x89 at offset 0)" in message and "binary" in message


def test_text_with_nul_bytes_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "nul.yaml"
    recipe.write_bytes(b"merge_method: linear\x00\n")
    assert "not valid YAML" in refused(recipe)


def test_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory, not a recipe file" in refused(tmp_path)


def test_deeply_nested_yaml_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "  [\n" * 5000 + "  ]\n" * 5000)
    assert "nests more than 64 levels deep" in refused(recipe)


@pytest.mark.parametrize("command", ["merge", "plan", "check"])
def test_cli_refuses_a_bomb_in_one_line_without_writing(command: str, tmp_path: Path) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(billion_laughs())
    before = snapshot(tmp_path)
    args = [command, str(recipe)] + ([str(tmp_path / "out")] if command == "merge" else [])
    started = time.perf_counter()
    result = runner.invoke(app, args)
    assert time.perf_counter() - started < 1.0
    assert result.exit_code == 1, result.output
    assert "aliases expand to more than 100000 values" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "plan"])
def test_cli_refuses_a_directory_and_a_binary_file(command: str, tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(128, 256)))
    for recipe, expected in ((tmp_path, "is a directory"), (binary, "not UTF-8 text")):
        result = runner.invoke(app, [command, str(recipe)] + ([str(tmp_path / "out")] if command == "merge" else []))
        assert result.exit_code == 1 and expected in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_dvc_stage_recipe_variant_reads_within_the_same_bounds(tmp_path: Path) -> None:
    from mergeflow.params import MergeParams
    from mergeflow.stage_records import write_recipe_variant

    bomb, plain = tmp_path / "bomb.yaml", tmp_path / "plain.yaml"
    bomb.write_text(billion_laughs())
    plain.write_text("merge_method: linear\nmodels:\n  - model: demo-family/add\n    parameters: {weight: 1.0}\n")
    with pytest.raises(RecipeError, match="aliases expand to more than 100000 values"):
        write_recipe_variant(MergeParams(recipe=bomb), tmp_path / "out.yaml")
    assert not (tmp_path / "out.yaml").exists()
    written = write_recipe_variant(MergeParams(recipe=plain, method="linear"), tmp_path / "out.yaml", rename={"demo-family/": "demo/"})
    assert "model: demo/add" in written.read_text()
