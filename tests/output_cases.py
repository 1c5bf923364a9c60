"""Helpers of the output-safety and fault tests: the CLI's merge as (exit code, one-line output), and file hashes."""
from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from mergeflow.cli import app

runner = CliRunner()


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def merge_cli(recipe: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``mergeflow merge RECIPE OUT --shard-size 20KB EXTRA...``: its exit code and its output on one line."""
    result = runner.invoke(app, ["merge", str(recipe), str(out), "--shard-size", "20KB", *extra])
    return result.exit_code, " ".join(result.output.split())
