"""`mergeflow run` and `mergeflow check` (both run Prefect flows)."""
from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_helpers import folder_bytes, ties_recipe, write_recipe
from tiny_family import CONFIG, base_state, fine_tune, write_model
from typer.testing import CliRunner

import flows.merge_pipeline  # noqa: F401  (Prefect sets up its log handlers on import: with the real stderr, not CliRunner's)
from mergeflow.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_check_prints_the_report(prefect_api: str, family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(str(family["base"]), str(family["ft_a"]), str(family["ft_b"])))
    result = runner.invoke(app, ["check", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "Compatibility: compatible" in result.output and "Weight space" in result.output


@pytest.mark.slow
def test_check_fails_listing_every_problem(prefect_api: str, family: dict[str, Path], tmp_path: Path) -> None:
    wide = dict(CONFIG, hidden_size=32)
    odd = write_model(tmp_path / "wide", fine_tune(base_state(config=wide), 5), config=wide)
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(str(family["base"]), str(family["ft_a"]), str(odd)))
    result = runner.invoke(app, ["check", str(recipe)])
    assert result.exit_code == 1
    assert "not compatible" in result.output and "hidden_size is 32" in result.output and "other shapes" in result.output


@pytest.mark.slow
def test_run_merges_like_merge(prefect_api: str, family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(str(family["base"]), str(family["ft_a"]), str(family["ft_b"])))
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "run"), "--shard-size", "20KB", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "model-00001-of-" in result.output and "pipeline" in result.output
    assert runner.invoke(app, ["merge", str(recipe), str(tmp_path / "merge"), "--shard-size", "20KB"]).exit_code == 0
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "merge")
    again = runner.invoke(app, ["run", str(recipe), str(tmp_path / "run")])
    assert again.exit_code == 1 and "pass --force" in again.output
