"""Output folders that appear only when complete: written in a staging folder beside them, renamed at the end."""
from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from merge_ops.errors import OutputExistsError


@contextmanager
def staged_output(out_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """A fresh staging folder that replaces ``out_dir`` when the block completes; removed if it raises.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is not set.

    Example:
        with staged_output(Path("out/merged")) as staging:
            (staging / "config.json").write_text("{}")
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputExistsError(str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
