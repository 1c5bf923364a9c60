"""OUT is never lost: one merge per OUT at a time, --force never replaces an input, nothing appearing at OUT is overwritten,
killed runs' staging folders are removed."""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from output_cases import merge_cli, runner, tree_hashes

import merge_ops.engine
import mergeflow.staging
from flows.merge_pipeline import merge_pipeline  # Prefect sets up its log handlers on import: with the real stderr, not CliRunner's
from merge_ops.engine import merge_model
from merge_ops.errors import OutputExistsError, OutputIsInputError, OutputLockedError
from merge_ops.output_folder import lock_file, move_into_place, output_lock
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from mergeflow.cli import app

pytestmark = pytest.mark.usefixtures("wide_errors")


def write_recipe(folder: Path, models: dict[str, Path]) -> Path:
    two = [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft_a", "ft_b")]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(models["base"]), "models": two, "dtype": "bfloat16"}))
    return path


def on_finalize(monkeypatch: pytest.MonkeyPatch, hook: Callable[[], None]) -> None:
    """Run ``hook`` when the merge has written its shards, before the model files and the final rename."""
    original = merge_ops.engine.finalize

    def finalize(plan: object, out_dir: Path) -> None:
        hook()
        original(plan, out_dir)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_ops.engine, "finalize", finalize)


def test_second_merge_into_the_same_out_fails_on_the_lock(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, out = write_recipe(tmp_path / "recipes", models), tmp_path / "out"
    assert merge_cli(recipe, tmp_path / "reference")[0] == 0
    inside, release = threading.Event(), threading.Event()
    first = threading.current_thread()

    def hold() -> None:
        if threading.current_thread() is not first:
            inside.set()
            assert release.wait(30)

    on_finalize(monkeypatch, hold)
    errors: list[BaseException] = []

    def merge_first() -> None:
        try:
            merge_model(plan_merge(load_recipe(recipe), shard_size=20_000), out)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            errors.append(err)

    worker = threading.Thread(target=merge_first)
    worker.start()
    assert inside.wait(30)
    code, output = merge_cli(recipe, out)
    code_forced, output_forced = merge_cli(recipe, out, "--force")
    release.set()
    worker.join(30)
    assert not errors
    assert code == code_forced == 1
    for text in (output, output_forced):
        assert f"{out} is being written by another merge (lock {lock_file(out)} is held)" in text and "Traceback" not in text
    assert tree_hashes(out) == tree_hashes(tmp_path / "reference")  # the first merge finished intact
    assert not list(tmp_path.glob(".out.staging-*"))


@pytest.mark.parametrize("where", ["source", "symlink to source", "parent of sources", "recipe folder"])
def test_force_never_replaces_an_input(where: str, models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipes", models)
    out = {"source": models["ft_a"], "symlink to source": tmp_path / "link", "parent of sources": tmp_path / "models",
           "recipe folder": tmp_path / "recipes"}[where]
    if where == "symlink to source":
        out.symlink_to(models["ft_b"], target_is_directory=True)
    before = tree_hashes(tmp_path)
    code, output = merge_cli(recipe, out, "--force")
    assert code == 1
    assert f"{out} cannot be replaced: it is or contains the input" in output and "choose an output path outside the inputs" in output
    assert tree_hashes(tmp_path) == before
    assert not list(out.parent.glob(f".{out.name}.staging-*"))


def test_force_replaces_a_symlinked_output_without_touching_its_target(tmp_path: Path) -> None:
    target, staging, out = tmp_path / "elsewhere", tmp_path / "staging", tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    staging.mkdir()
    (staging / "model.txt").write_text("new")
    out.symlink_to(target, target_is_directory=True)
    with pytest.raises(OutputIsInputError):
        move_into_place(staging, out, force=True, inputs=[target])
    move_into_place(staging, out, force=True)
    assert not out.is_symlink() and (out / "model.txt").read_text() == "new" and (target / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_folder_appearing_at_out_during_the_merge_is_kept(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, out = write_recipe(tmp_path / "recipes", models), tmp_path / "out"

    def appear() -> None:
        out.mkdir()
        (out / "theirs.txt").write_text("someone else's")

    on_finalize(monkeypatch, appear)
    code, output = merge_cli(recipe, out)
    assert code == 1
    assert f"{out} already exists: choose another output path or pass --force to replace it" in output
    assert tree_hashes(out) == {"theirs.txt": hashlib.sha256(b"someone else's").hexdigest()}
    assert not list(tmp_path.glob(".out.staging-*"))


def test_empty_folder_appearing_at_out_is_kept_too(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain rename would replace an empty folder: the final rename refuses anything at OUT (renameat2 RENAME_NOREPLACE)."""
    recipe, out = write_recipe(tmp_path / "recipes", models), tmp_path / "out"
    on_finalize(monkeypatch, out.mkdir)
    code, output = merge_cli(recipe, out)
    assert code == 1 and f"{out} already exists" in output
    assert out.is_dir() and list(out.iterdir()) == [] and not list(tmp_path.glob(".out.staging-*"))


def test_pipeline_publish_keeps_an_output_that_appeared(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = mergeflow.staging.prepare_staging(plan_merge(load_recipe(write_recipe(tmp_path / "recipes", models)), shard_size=20_000), out)
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(OutputExistsError, match="already exists"):
        mergeflow.staging.publish_staging(staging, [])
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and staging.plan_path.is_file()  # the staging folder stays resumable


def test_stale_staging_of_a_killed_merge_is_removed(models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe, out = write_recipe(tmp_path / "recipes", models), tmp_path / "out"
    stale = tmp_path / ".out.staging-0badc0de"
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half a shard")
    assert merge_cli(recipe, out)[0] == 0
    assert not stale.exists() and f"removing {stale}, left by a merge into {out} that did not finish" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out", "recipes"]


def test_extract_lora_force_never_replaces_its_models(models: dict[str, Path], tmp_path: Path) -> None:
    before = tree_hashes(tmp_path)
    for out in (models["ft_a"], models["base"], tmp_path / "models"):
        result = runner.invoke(app, ["extract-lora", str(models["ft_a"]), str(models["base"]), str(out), "--rank", "2", "--force"])
        assert result.exit_code == 1
        assert f"{out} cannot be replaced: it is or contains the input" in " ".join(result.output.split())
    assert tree_hashes(tmp_path) == before


def test_pipeline_staging_refuses_to_replace_a_source(models: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_merge(load_recipe(write_recipe(tmp_path / "recipes", models)), shard_size=20_000)
    before = tree_hashes(tmp_path)
    with pytest.raises(OutputIsInputError, match="cannot be replaced"):
        mergeflow.staging.prepare_staging(plan, models["base"], force=True)
    with pytest.raises(OutputIsInputError, match="cannot be replaced"):
        mergeflow.staging.prepare_staging(plan, tmp_path / "recipes", force=True, inputs=[tmp_path / "recipes" / "recipe.yaml"])
    assert tree_hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["models", "recipes"]


def test_run_fails_at_once_on_the_lock_and_never_replaces_a_source(models: dict[str, Path], tmp_path: Path) -> None:
    recipe, out = write_recipe(tmp_path / "recipes", models), tmp_path / "out"
    with output_lock(out):
        locked = runner.invoke(app, ["run", str(recipe), str(out), "--shard-size", "20KB"])
    assert locked.exit_code == 1
    assert f"{out} is being written by another merge (lock {lock_file(out)} is held)" in " ".join(locked.output.split())
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    before = tree_hashes(tmp_path)
    for target in (models["ft_b"], tmp_path / "recipes"):
        forced = runner.invoke(app, ["run", str(recipe), str(target), "--shard-size", "20KB", "--force"])
        assert forced.exit_code == 1
        assert f"{target} cannot be replaced: it is or contains the input" in " ".join(forced.output.split())
    assert tree_hashes(tmp_path) == before


@pytest.mark.slow
def test_pipeline_holds_the_lock_and_never_replaces_a_source(prefect_api: str, models: dict[str, Path], tmp_path: Path) -> None:
    recipe, out = write_recipe(tmp_path / "recipes", models), tmp_path / "out"
    with output_lock(out), pytest.raises(OutputLockedError, match="is being written by another merge"):
        merge_pipeline(recipe=recipe, out=out, shard_size=20_000)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    before = tree_hashes(tmp_path)
    with pytest.raises(OutputIsInputError, match="cannot be replaced"):
        merge_pipeline(recipe=recipe, out=models["ft_b"], shard_size=20_000, force=True)
    assert tree_hashes(tmp_path) == before


@pytest.mark.slow
def test_pipeline_never_replaces_huggingface_hubs_default_cache(prefect_api: str, models: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MERGEFLOW_HF_CACHE the downloads go to huggingface_hub's cache: that folder (or one holding it) is an input too."""
    from huggingface_hub import constants

    from mergeflow import settings

    cache = tmp_path / "hf-home" / "hub"
    (cache / "models--org--x").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(settings, "HF_CACHE_DIR", None)
    recipe = write_recipe(tmp_path / "recipes", models)
    before = tree_hashes(tmp_path)
    with pytest.raises(OutputIsInputError, match="cannot be replaced"):
        merge_pipeline(recipe=recipe, out=tmp_path / "hf-home", shard_size=20_000, force=True)
    assert tree_hashes(tmp_path) == before and (cache / "models--org--x").is_dir()
