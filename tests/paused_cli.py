"""Run the mergeflow CLI with every merged piece slowed down, touching MARKER when the first piece starts.

    python tests/paused_cli.py MARKER SECONDS_PER_PIECE merge RECIPE OUT ...

Lets a test send a real SIGINT or SIGKILL while a shard is being written, without a model large enough to take that long.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import merge_ops.engine
from mergeflow.cli import main


def slowed(marker: Path, seconds: float) -> None:
    merge_tensor = merge_ops.engine.merge_tensor

    def slow(*args: object, **kwargs: object) -> object:
        marker.touch()
        time.sleep(seconds)
        return merge_tensor(*args, **kwargs)  # type: ignore[arg-type]

    merge_ops.engine.merge_tensor = slow  # type: ignore[assignment]


if __name__ == "__main__":
    slowed(Path(sys.argv[1]), float(sys.argv[2]))
    sys.argv = ["mergeflow", *sys.argv[3:]]
    main()
