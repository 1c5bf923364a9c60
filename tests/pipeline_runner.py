"""Run merge_pipeline in its own process for the resume test, each shard slowed by --delay seconds.

    python tests/pipeline_runner.py RECIPE OUT --shard-size 2000 --delay 0.5
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from prefect.task_runners import ThreadPoolTaskRunner

import tasks.shards
from flows.merge_pipeline import merge_pipeline

torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shard-size", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    merge_file = tasks.shards.merge_shard_file

    def slow_merge(*a: object, **k: object) -> tasks.shards.ShardResult:
        time.sleep(args.delay)
        return merge_file(*a, **k)

    tasks.shards.merge_shard_file = slow_merge
    merge_pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(recipe=args.recipe, out=args.out, shard_size=args.shard_size)


if __name__ == "__main__":
    main()
