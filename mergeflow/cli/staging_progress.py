"""A progress bar for ``mergeflow run``: it follows the pipeline's staging folder, whatever runs the shards.

Shard tasks may run in threads, in local Dask processes or on a cluster sharing the filesystem, so the bar
watches what they write (``.OUT.staging-*/*.safetensors[.partial]``) instead of hooking into them.
"""
from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from merge_ops.plan import MergePlan


class StagingProgress:
    """Show bytes written into the newest staging folder of ``out``, polling every ``interval`` seconds.

    Example:
        >>> with StagingProgress(out, Console(stderr=True)):
        ...     merge_pipeline(recipe=recipe, out=out)
    """

    def __init__(self, out: Path, console: Console, *, interval: float = 0.5) -> None:
        self.out = Path(out).absolute()
        self.interval = interval
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self._task = self.progress.add_task("waiting for the plan", total=None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="staging-progress", daemon=True)
        self._folder: Path | None = None
        self._total = 0

    def _poll(self) -> None:
        if self._folder is None or not self._folder.exists():
            folders = [f for f in self.out.parent.glob(f".{self.out.name}.staging-*") if (f / "plan.json").is_file()]
            if not folders:
                return
            self._folder = max(folders, key=lambda f: f.stat().st_mtime)
            try:
                self._total = MergePlan.model_validate_json((self._folder / "plan.json").read_text()).total_size
            except (OSError, ValueError):
                self._folder = None
                return
            self.progress.update(self._task, description="merging shards", total=self._total)
        try:
            written = sum(f.stat().st_size for f in self._folder.glob("*.safetensors*"))
        except OSError:  # renamed into place or a file replaced while listing: try again next time
            return
        self.progress.update(self._task, completed=min(written, self._total))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> StagingProgress:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        if kind is None and self._total:
            self.progress.update(self._task, completed=self._total)
        self.progress.stop()
