"""The mergeflow CLI: merge, plan, methods and one-line errors."""
from __future__ import annotations

from pathlib import Path

import yaml
from method_cases import METHODS  # the registry
from typer.testing import CliRunner

from mergeflow.cli import app, parse_size

runner = CliRunner()


def write_recipe(tmp_path: Path, family: dict[str, Path], **overrides: object) -> Path:
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft_a", "ft_b")],
        "dtype": "bfloat16",
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_writes_model_and_prints_summary(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, family)
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--shard-size", "20KB", "--threads", "1"])
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and all(name in result.output for name in shards)
    assert "tensors" in result.output and "peak RSS" in result.output
    assert "merge_method: ties" in (tmp_path / "out" / "README.md").read_text()


def test_plan_shows_shards_bytes_and_memory(family: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(write_recipe(tmp_path, family)), "--shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    assert "model-00001-of-" in result.output
    assert "tensors: 39" in result.output and "expected peak memory" in result.output


def test_bad_recipe_is_one_clear_error(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, family, parameters={"lambda": "big"})
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "parameters.lambda" in result.output and "'big'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cuda_request_without_gpu_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, family)), str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 1 and "CUDA is not available" in result.output


def test_methods_lists_every_method() -> None:
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})  # wide enough that no cell wraps
    assert result.exit_code == 0, result.output
    rows: dict[str, list[list[str]]] = {}  # method -> its lines' [base model, parameter, what it does] cells
    for line in result.output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 4:  # a body line (the header row uses ┃)
            if cells[0]:
                rows[cells[0]] = []
            rows[next(reversed(rows))].append(cells[1:])
    assert list(rows) == list(METHODS)  # every registered method, in registry order, nothing else
    for m in METHODS.values():
        base, params, summary = ([c for c in column if c] for column in zip(*rows[m.name], strict=False))
        assert base == [m.base], m.name
        assert params == [f"{name}: {p.describe()}" for name, p in m.params.items()], m.name
        assert " ".join(summary) == m.summary, m.name


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1234") == 1234
