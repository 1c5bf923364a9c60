"""Output folders that appear only when complete, and never at the cost of an input or another run's output.

A merge into OUT holds an exclusive lock (``flock``) on ``.OUT.lock`` beside it for its whole run, writes into a staging folder
``.OUT.staging-*`` beside it and renames that to OUT at the end, checking under the lock that nothing appeared at OUT
meanwhile. Staging folders found under the lock belong to no running merge (killed ones): they are removed, unless the
caller reuses one. ``--force`` replaces OUT only when OUT (symlinks resolved) neither is nor contains an input.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from merge_ops.errors import OutputExistsError, OutputIsInputError, OutputLockedError, OutputWriteError
from merge_ops.recipe import Recipe

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file is larger than the filesystem allows"}
_NOT_WRITABLE = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


@contextmanager
def output_write_errors(out_dir: Path) -> Iterator[None]:
    """Turn the block's failures to write next to ``out_dir`` (full or read-only disk, no permission) into one OutputWriteError.

    A full disk is always the output's (inputs are only read); a permission error only when it names the output's folder,
    OUT itself or one of OUT's companions (``.OUT.*``: lock, staging).

    Raises:
        OutputWriteError: the output could not be written.
    """
    out_dir = Path(out_dir).absolute()
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as err:
        if err.errno in _NO_SPACE:
            raise OutputWriteError(str(out_dir), f"{_NO_SPACE[err.errno]} ({err.strerror})",
                                   f"free space on {out_dir.parent} (df -h {out_dir.parent}) or choose an output path on another disk") from None
        named = Path(os.fsdecode(err.filename)).absolute() if err.filename else out_dir.parent
        if err.errno in _NOT_WRITABLE and _is_output_path(named, out_dir):
            raise OutputWriteError(str(out_dir), f"{_NOT_WRITABLE[err.errno]} ({named})",
                                   "choose an output path in a folder you can write, or fix its permissions or mount") from None
        raise


def _is_output_path(path: Path, out_dir: Path) -> bool:
    """Whether ``path`` is the folder of ``out_dir`` (or above it), or lies in OUT or one of its ``.OUT.*`` companions."""
    if path == out_dir.parent or path in out_dir.parent.parents:
        return True
    if out_dir.parent not in path.parents:
        return False
    top = path.relative_to(out_dir.parent).parts[0]
    return top == out_dir.name or top.startswith(f".{out_dir.name}.")


def lock_file(out_dir: Path) -> Path:
    """The lock file of ``out_dir``: ``.OUT.lock`` beside it."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.lock"


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``out_dir`` for the block (released when it ends, or when the process dies).

    The lock file is removed when the block ends; one left by a killed process is simply locked again.

    Raises:
        OutputLockedError: another merge holds it.

    Example:
        with output_lock(Path("out/merged")):
            ...
    """
    path = lock_file(out_dir)
    with output_write_errors(out_dir):
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with output_write_errors(out_dir):
            handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputLockedError(str(Path(out_dir).absolute()), str(path)) from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), path.stat()):
                break
        except FileNotFoundError:
            pass
        handle.close()  # the holder removed the file between our open and lock: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so whoever waits on this file finds it gone and retries
        handle.close()


def is_locked(out_dir: Path) -> bool:
    """Whether a merge holds the lock of ``out_dir`` now (changes nothing on disk)."""
    try:
        handle = lock_file(out_dir).open("r")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def check_unlocked(out_dir: Path) -> None:
    """Fail now if another merge is writing ``out_dir`` (for failing fast; the merge itself takes the lock).

    Raises:
        OutputLockedError: another merge holds the lock.
    """
    with output_lock(out_dir):
        pass


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The local folders and files a recipe reads: its file and folder, and each model or adapter folder found locally."""
    refs = [r for ref in recipe.referenced_models for r in (ref, ref.adapter_ref) if r is not None]
    found = [c for ref in refs for c in (Path(ref.path), recipe.base_dir / ref.path) if c.exists()]
    return found + ([recipe.path, recipe.base_dir] if recipe.path is not None else [])


def check_replaceable(out_dir: Path, inputs: Iterable[Path]) -> None:
    """Refuse to replace ``out_dir`` when it is, or contains, one of ``inputs`` (symlinks resolved on both sides).

    Raises:
        OutputIsInputError: ``out_dir`` is or contains an input.
    """
    target = Path(out_dir).resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            raise OutputIsInputError(str(out_dir), str(source))


def remove_stale_staging(out_dir: Path, *, keep: Path | None = None) -> list[Path]:
    """Remove the staging folders of ``out_dir`` left by killed runs (call it holding the lock), except ``keep``; returns them."""
    out_dir = Path(out_dir).absolute()
    stale = sorted(p for p in out_dir.parent.glob(f".{out_dir.name}.staging-*") if p != keep)
    for folder in stale:
        log.warning("removing %s, left by a merge into %s that did not finish", folder, out_dir)
        shutil.rmtree(folder)
    return stale


def move_into_place(staging: Path, out_dir: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Rename the complete ``staging`` folder to ``out_dir`` (call it holding the lock).

    What appeared at ``out_dir`` meanwhile is kept unless ``force``; with ``force`` it is moved aside, replaced and deleted
    (a symlink itself, never what it points to), unless it is or contains one of ``inputs``.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is not set.
        OutputIsInputError: ``force`` is set and ``out_dir`` is or contains an input.
    """
    out_dir = Path(out_dir).absolute()
    if not (out_dir.exists() or out_dir.is_symlink()):
        try:
            rename_no_replace(staging, out_dir)  # fails on anything that appeared since the check, an empty folder included
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OutputExistsError(str(out_dir)) from None
            raise
        return
    if not force:
        raise OutputExistsError(str(out_dir))
    check_replaceable(out_dir, inputs)
    old = out_dir.parent / f".{out_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old)


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` atomically, failing with EEXIST if ``target`` exists (Linux ``renameat2`` with
    ``RENAME_NOREPLACE``); where the kernel or filesystem lacks it, a plain rename, which still refuses a non-empty folder.

    Raises:
        OSError: EEXIST when ``target`` exists, or the rename's own error.
    """
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(target))
    os.rename(source, target)


@contextmanager
def staged_output(out_dir: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """A fresh staging folder that becomes ``out_dir`` when the block completes; removed if it raises.

    Holds the lock of ``out_dir`` throughout and removes staging folders of killed runs first.

    Raises:
        OutputExistsError: ``out_dir`` exists (or appears meanwhile) and ``force`` is not set.
        OutputIsInputError: ``force`` is set and ``out_dir`` is or contains one of ``inputs``.
        OutputLockedError: another merge is writing ``out_dir``.

    Example:
        with staged_output(Path("out/merged")) as staging:
            (staging / "config.json").write_text("{}")
    """
    if Path(out_dir).exists() and not force:
        raise OutputExistsError(str(out_dir))
    out_dir, inputs = Path(out_dir).absolute(), list(inputs)
    check_replaceable(out_dir, inputs)
    with output_lock(out_dir):
        remove_stale_staging(out_dir)
        staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
        try:
            with output_write_errors(out_dir):
                staging.mkdir()
                yield staging
                move_into_place(staging, out_dir, force=force, inputs=inputs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
