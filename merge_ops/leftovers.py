"""What killed merges leave beside their output folders, and putting it right (``mergeflow clean``).

A merge into OUT works in ``.OUT.staging-*`` (removed by the next merge into OUT, or reused by a resumed
``mergeflow run``) and, with ``--force``, moves the old OUT aside to ``.OUT.replaced-*`` for the instant of the
swap. A merge killed in that instant leaves the old model there and no OUT: it is moved back, never deleted.
Leftovers of an OUT whose merge is running (its lock is held) are left alone.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from merge_ops.errors import OutputLockedError
from merge_ops.output_folder import is_locked, output_lock

LEFTOVER = re.compile(r"^\.(?P<out>.+)\.(?P<kind>staging|replaced)-[0-9a-f]+$")
Action = Literal["removed", "restored", "in use", "would remove", "would restore"]


@dataclass(frozen=True)
class Leftover:
    """A staging or replaced folder, the output it belongs to, its size and what was (or would be) done with it."""

    path: Path
    out: Path
    kind: str
    nbytes: int
    action: Action


def find_leftovers(path: Path) -> list[tuple[Path, Path, str]]:
    """(leftover, its OUT, kind) for OUT = ``path`` and, when ``path`` is a folder, for every output inside it."""
    path = Path(path).absolute()
    candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*-*"))
    if path.is_dir() and not path.is_symlink():
        candidates += list(path.glob(".*.*-*"))
    found = []
    for candidate in sorted(set(candidates)):
        match = LEFTOVER.match(candidate.name)
        if match:
            found.append((candidate, candidate.parent / match["out"], match["kind"]))
    return found


def clean_leftovers(path: Path, *, dry_run: bool = False) -> list[Leftover]:
    """Remove the staging folders and restore or remove the replaced folders of ``path`` (an OUT, or a folder of outputs).

    A replaced folder goes back to OUT when OUT is missing (a ``--force`` merge killed mid-swap) and is removed otherwise.

    Example:
        for item in clean_leftovers(Path("outputs")):
            print(item.action, item.path)
    """
    done = []
    for leftover, out, kind in find_leftovers(path):
        size = folder_size(leftover)
        if dry_run:
            restore = kind == "replaced" and not (out.exists() or out.is_symlink())
            action: Action = "in use" if is_locked(out) else "would restore" if restore else "would remove"
        else:
            action = _clean(leftover, out, kind)
        done.append(Leftover(leftover, out, kind, size, action))
    return done


def _clean(leftover: Path, out: Path, kind: str) -> Action:
    """Restore or remove one leftover holding its output's lock; "in use" when a merge holds it."""
    try:
        with output_lock(out):
            if kind == "replaced" and not (out.exists() or out.is_symlink()):
                os.rename(leftover, out)
                return "restored"
            if leftover.is_symlink() or not leftover.is_dir():
                leftover.unlink()
            else:
                shutil.rmtree(leftover)
            return "removed"
    except OutputLockedError:
        return "in use"


def folder_size(path: Path) -> int:
    """Bytes in the files under ``path`` (symlinks not followed)."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)
