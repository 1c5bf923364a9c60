"""Faults around a merge: a full or read-only output disk, Ctrl-C, leftovers of killed merges, and how Prefect's run
logs report a failure. Each case checks the exit code, the one-line message, and that no input and no output changed."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from output_cases import merge_cli, runner, tree_hashes

import merge_ops.direct_io
from flows.merge_pipeline import merge_pipeline  # noqa: F401  (Prefect sets up its log handlers on import, with the real stderr)
from merge_ops.direct_io import SequentialWriter
from merge_ops.engine import merge_model
from merge_ops.errors import ModelNotFoundError, OutputWriteError
from merge_ops.leftovers import clean_leftovers
from merge_ops.output_folder import lock_file, output_lock, output_write_errors
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from merge_ops.stop import STOP, MergeStopped
from mergeflow.cli import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("wide_errors")


@pytest.fixture
def recipe(models: dict[str, Path], tmp_path: Path) -> Path:
    two = [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("ft_a", "ft_b")]
    path = tmp_path / "recipes" / "recipe.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(models["base"]), "models": two, "dtype": "float32"}))
    return path


@pytest.fixture
def inputs_unchanged(models: dict[str, Path], recipe: Path) -> Iterator[None]:
    """The models and the recipe are byte-identical after the test."""
    before = {p: tree_hashes(p) for p in [*models.values(), recipe.parent]}
    yield
    assert {p: tree_hashes(p) for p in before} == before


def nothing_beside(out: Path) -> list[str]:
    """What a merge into ``out`` left in its folder (OUT, staging, lock): nothing, after a failure."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only): too small for a model of the tiny family."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the simulated ENOSPC case covers the rest)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


# -- a full or read-only output disk ------------------------------------------------------------


def test_the_writer_reports_enospc_and_aborts_cleanly() -> None:
    """/dev/full fails every write with ENOSPC: the error is ENOSPC (not 'BufferError: exported pointers exist'), and abort works."""
    writer = SequentialWriter(Path("/dev/full"))
    with pytest.raises(OSError) as raised:
        writer.write(b"\0" * (merge_ops.direct_io.CHUNK + 1))
    assert raised.value.errno == errno.ENOSPC
    writer.abort()


def test_full_disk_simulated(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inputs_unchanged: None) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(merge_ops.direct_io.os, "write", full)
    out = tmp_path / "out" / "merged"
    code, text = merge_cli(recipe, out)
    assert code == 1
    assert f"error: cannot write {out}: the disk is full (No space left on device); free space on {out.parent}" in text
    assert "Traceback" not in text and nothing_beside(out) == []


def test_full_disk_tmpfs(recipe: Path, tmpfs: Path, inputs_unchanged: None) -> None:
    out = tmpfs / "merged"
    code, text = merge_cli(recipe, out)
    assert code == 1
    assert f"error: cannot write {out}: the disk is full" in text and "BufferError" not in text
    assert nothing_beside(out) == []


def test_read_only_disk(recipe: Path, tmpfs: Path, inputs_unchanged: None) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    out = tmpfs / "merged"
    code, text = merge_cli(recipe, out)
    assert code == 1
    assert f"error: cannot write {out}: the filesystem is read-only ({lock_file(out)}); choose an output path in a folder you can write" in text
    assert list(tmpfs.iterdir()) == []


def test_permission_errors_on_inputs_stay_what_they_are(tmp_path: Path) -> None:
    """Only the output's own paths become OutputWriteError; an unreadable input keeps its own error."""
    out = tmp_path / "merged"
    with pytest.raises(PermissionError), output_write_errors(out):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "model" / "model.safetensors"))
    with pytest.raises(OutputWriteError, match="permission denied"), output_write_errors(out):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".merged.staging-0123abcd" / "model.safetensors"))


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_stop_request_ends_the_shard_between_pieces(recipe: Path, tmp_path: Path, inputs_unchanged: None) -> None:
    out = tmp_path / "merged"
    STOP.set()
    try:
        with pytest.raises(MergeStopped):
            merge_model(plan_merge(load_recipe(recipe)), out)
    finally:
        STOP.clear()
    assert nothing_beside(out) == []


def interrupt_slowed_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI with slowed pieces, send SIGINT once the first piece is being merged, return the finished process."""
    marker = tmp_path / "first-piece"
    command = [sys.executable, str(ROOT / "tests" / "paused_cli.py"), str(marker), "0.5", *args]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "1000", **(env or {})})
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert time.monotonic() - started < 30, "the interrupted command did not stop promptly"
    return subprocess.CompletedProcess(command, process.returncode, stdout, " ".join(stderr.split()))


def test_sigkill_during_merge_leaves_staging_that_the_next_merge_removes(recipe: Path, tmp_path: Path, inputs_unchanged: None) -> None:
    out = tmp_path / "out" / "merged"
    marker = tmp_path / "first-piece"
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_cli.py"), str(marker), "0.5", "merge", str(recipe), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    [staging] = [p for p in out.parent.iterdir() if p.name.startswith(".merged.staging-")]
    listed = runner.invoke(app, ["clean", str(out), "--dry-run"])
    assert listed.exit_code == 0 and "would remove" in listed.output and staging.exists()
    code, text = merge_cli(recipe, out)
    assert code == 0, text
    assert not staging.exists() and (out / "config.json").is_file()


def test_ctrl_c_during_merge(recipe: Path, tmp_path: Path, inputs_unchanged: None) -> None:
    out = tmp_path / "out" / "merged"
    done = interrupt_slowed_cli(tmp_path, "merge", str(recipe), str(out), "--shard-size", "20KB")
    assert done.returncode == 130
    assert f"interrupted: nothing was written to {out} (its staging folder is removed)" in done.stderr
    assert "Traceback" not in done.stderr and nothing_beside(out) == []


@pytest.mark.slow
def test_ctrl_c_during_run_keeps_a_resumable_staging_folder(prefect_api: str, recipe: Path, tmp_path: Path, inputs_unchanged: None) -> None:
    out = tmp_path / "out" / "merged"
    done = interrupt_slowed_cli(tmp_path, "run", str(recipe), str(out), "--shard-size", "20KB", "--workers", "1", env={"PREFECT_API_URL": prefect_api})
    assert done.returncode == 130
    assert f"interrupted: {out} was not written; the shards finished so far are kept in" in done.stderr
    assert "Traceback" not in done.stderr
    kept = [p for p in out.parent.iterdir() if p.name.startswith(".merged.staging-")]
    assert len(kept) == 1 and not out.exists() and not list(kept[0].glob("*.partial"))
    result = runner.invoke(app, ["run", str(recipe), str(out), "--shard-size", "20KB"])  # resumes into the same staging folder
    assert result.exit_code == 0, result.output
    assert not kept[0].exists() and (out / "config.json").is_file()


# -- leftovers of killed merges: `mergeflow clean` ----------------------------------------------------


def leftover(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    for file, data in files.items():
        (path / file).write_bytes(data)
    return path


def test_clean_removes_staging_folders(tmp_path: Path) -> None:
    staging = leftover(tmp_path, ".merged.staging-0123abcd", {"model.safetensors": b"x" * 1000})
    keep = leftover(tmp_path, "merged-other", {"config.json": b"{}"})
    result = runner.invoke(app, ["clean", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert not staging.exists() and keep.exists() and "1.0 KB freed" in " ".join(result.output.split())


def test_clean_dry_run_changes_nothing(tmp_path: Path) -> None:
    staging = leftover(tmp_path, ".merged.staging-0123abcd", {"model.safetensors": b"x" * 10})
    result = runner.invoke(app, ["clean", str(tmp_path / "merged"), "--dry-run"])
    assert result.exit_code == 0 and "would remove" in result.output and tree_hashes(staging) == {"model.safetensors": hashlib.sha256(b"x" * 10).hexdigest()}


def test_clean_restores_an_output_a_killed_force_merge_moved_aside(tmp_path: Path) -> None:
    """Killed between moving the old OUT aside and moving the new one in: the old model comes back, it is never deleted."""
    aside = leftover(tmp_path, ".merged.replaced-89abcdef", {"model.safetensors": b"old model"})
    [item] = clean_leftovers(tmp_path / "merged")
    assert item.action == "restored" and not aside.exists()
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == b"old model"


def test_clean_removes_a_replaced_folder_once_the_new_output_is_in_place(tmp_path: Path) -> None:
    aside = leftover(tmp_path, ".merged.replaced-89abcdef", {"model.safetensors": b"old model"})
    leftover(tmp_path, "merged", {"model.safetensors": b"new model"})
    [item] = clean_leftovers(tmp_path)
    assert item.action == "removed" and not aside.exists()
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == b"new model"


def test_clean_leaves_a_running_merge_alone(tmp_path: Path) -> None:
    staging = leftover(tmp_path, ".merged.staging-0123abcd", {"model.safetensors": b"being written"})
    with output_lock(tmp_path / "merged"):
        [item] = clean_leftovers(tmp_path)
        [dry] = clean_leftovers(tmp_path, dry_run=True)
    assert item.action == dry.action == "in use" and staging.exists()


def test_clean_with_nothing_to_clean(tmp_path: Path) -> None:
    result = runner.invoke(app, ["clean", str(tmp_path)])
    assert result.exit_code == 0 and "nothing to clean" in result.output


# -- Prefect's run logs ------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def run_logs() -> Iterator[list[logging.LogRecord]]:
    """The records Prefect's flow and task run loggers pass on (after their filters)."""
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.slow
def test_a_failed_run_logs_its_error_once_without_tracebacks(prefect_api: str, recipe: Path, tmp_path: Path,
                                                            run_logs: list[logging.LogRecord]) -> None:
    missing = tmp_path / "no-such-model"
    broken = yaml.safe_load(recipe.read_text())
    broken["models"][0]["model"] = str(missing)
    bad = tmp_path / "recipes" / "broken.yaml"
    bad.write_text(yaml.safe_dump(broken))
    out = tmp_path / "out" / "merged"
    result = runner.invoke(app, ["run", str(bad), str(out)])
    message = str(ModelNotFoundError(str(missing), "not a local folder, nor a Hub repo id of the form org/name"))
    assert result.exit_code == 1 and f"error: {message}" in " ".join(result.output.split())
    assert [r for r in run_logs if r.exc_info or r.exc_text] == []
    errors = [r.getMessage() for r in run_logs if r.levelno >= logging.ERROR and message in r.getMessage()]
    assert len(errors) == 1, errors
    assert not out.exists()


@pytest.mark.slow
def test_full_disk_during_run(prefect_api: str, recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              run_logs: list[logging.LogRecord], inputs_unchanged: None) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(merge_ops.direct_io.os, "write", full)
    out = tmp_path / "out" / "merged"
    result = runner.invoke(app, ["run", str(recipe), str(out), "--shard-size", "20KB"])
    assert result.exit_code == 1
    assert f"error: cannot write {out}: the disk is full (No space left on device)" in " ".join(result.output.split())
    assert not out.exists() and [r for r in run_logs if r.exc_info or r.exc_text] == []
