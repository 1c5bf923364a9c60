"""Planning into a staging folder, merging shards as independent tasks, and publishing the folder when complete.

The staging folder is a function of the output path and the plan's hash
(``OUT.parent/.OUT.name.staging-<plan sha256[:12]>``), so a run killed mid-merge and started again finds
it: shards already there (each written atomically by ``merge_ops.engine.merge_shard``) are not recomputed.
Prefect's cache does the skipping: a shard task's key is (plan hash, shard index), its result (file, sha256)
is persisted in ``<staging>/.results``; before the shards run, a shard file without its record (or a record
without its file) is dropped, so the shards skipped are exactly those with both.
The caller holds OUT's lock (``merge_ops.output_folder.output_lock``) from planning to publishing, so staging folders of
other plans are left by killed runs and are removed. The finished model appears at OUT by rename, never partially, and
``force`` never replaces a folder that is or contains an input.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel

from merge_ops.compatibility import CompatibilityReport
from merge_ops.engine import finalize
from merge_ops.engine import merge_shard as merge_plan_shard
from merge_ops.errors import OutputExistsError
from merge_ops.headers import ModelHeaders
from merge_ops.output_folder import check_replaceable, move_into_place, output_write_errors, remove_stale_staging
from merge_ops.plan import MergePlan, plan_merge
from merge_ops.recipe import Recipe

PLAN_FILE = "plan.json"
RESULTS_DIR = ".results"


class Staging(BaseModel):
    """Where a planned merge is being written, and what it will produce."""

    dir: Path
    out: Path
    plan_sha256: str
    shard_files: list[str]
    total_size: int
    input_bytes: int
    tensor_count: int
    done_before: list[int]
    """Shards already in the folder when this run started (a resumed run)."""
    removed_staging: list[Path] = []
    """Staging folders of ``out`` for other plans, left by killed runs and removed by this one."""
    inputs: list[Path] = []
    """What ``force`` must not replace: the models, adapters, recipe and caches the merge reads."""

    @property
    def plan_path(self) -> Path:
        return self.dir / PLAN_FILE

    @property
    def results_dir(self) -> Path:
        return self.dir / RESULTS_DIR


class ShardResult(BaseModel):
    index: int
    file: str
    sha256: str
    nbytes: int
    started: float
    seconds: float


def staging_dir_for(out: Path, plan_sha256: str) -> Path:
    """The staging folder of ``out`` for a plan: the same for the same plan, so reruns find it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.staging-{plan_sha256[:12]}"


def out_of_staging_dir(staging_dir: Path) -> Path:
    """The output path a staging folder (``staging_dir_for``) is for."""
    staging_dir = Path(staging_dir).absolute()
    return staging_dir.parent / staging_dir.name[1 : staging_dir.name.rindex(".staging-")]


def shard_cache_key(plan_sha256: str, index: int) -> str:
    return f"merge_shard-{plan_sha256[:16]}-{index:05d}"


def prepare_staging(plan: MergePlan, out: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Staging:
    """Create (or reuse) the staging folder, write the plan into it, drop stale shard records and other plans' staging folders.

    Call it holding ``out``'s lock (``merge_ops.output_folder.output_lock``).

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
        OutputIsInputError: ``force`` is set and ``out`` is or contains a model of the plan or one of ``inputs``.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputExistsError(str(out))
    sources = [Path(p) for p in plan.sources.values()] + list(inputs)
    check_replaceable(out, sources)
    text = plan.model_dump_json()
    digest = hashlib.sha256(text.encode()).hexdigest()
    folder = staging_dir_for(out, digest)
    removed = remove_stale_staging(out, keep=folder)
    with output_write_errors(out):
        (folder / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
        if not (folder / PLAN_FILE).is_file():
            tmp = folder / f"{PLAN_FILE}.partial"
            tmp.write_text(text)
            os.replace(tmp, folder / PLAN_FILE)
    for partial in folder.glob("*.partial"):
        partial.unlink()
    done = []
    for i, shard in enumerate(plan.shards):
        record = folder / RESULTS_DIR / shard_cache_key(digest, i)
        if (folder / shard.file).is_file() and record.is_file():
            done.append(i)
        else:  # a file without its record (killed in between) or a record without its file: redo that shard
            (folder / shard.file).unlink(missing_ok=True)
            record.unlink(missing_ok=True)
    return Staging(
        dir=folder, out=out, plan_sha256=digest, shard_files=[s.file for s in plan.shards], total_size=plan.total_size,
        input_bytes=plan.input_bytes, tensor_count=plan.tensor_count, done_before=done,
        removed_staging=removed, inputs=sources,
    )


def plan_into_staging(
    recipe: Recipe, models: Mapping[str, ModelHeaders], out: Path, *, shard_size: int, compute_dtype: str, checked: CompatibilityReport,
    force: bool = False, inputs: Iterable[Path] = (),
) -> Staging:
    """Plan the merge of ``recipe`` over the models' headers (weights local, compatibility ``checked``) and prepare its staging folder."""
    plan = plan_merge(recipe, models, shard_size=shard_size, compute_dtype=compute_dtype, checked=checked)
    return prepare_staging(plan, out, force=force, inputs=inputs)


def merge_shard_file(plan_path: Path, index: int, staging_dir: Path, *, device: str = "cpu", allow_nonfinite: bool = False) -> ShardResult:
    """Write shard ``index`` of the plan at ``plan_path`` into ``staging_dir`` (atomically)."""
    plan = MergePlan.model_validate_json(Path(plan_path).read_text())
    started = time.time()
    with output_write_errors(out_of_staging_dir(staging_dir)):
        digest = merge_plan_shard(plan, index, staging_dir, device=device, allow_nonfinite=allow_nonfinite)
    return ShardResult(index=index, file=plan.shards[index].file, sha256=digest, nbytes=plan.shards[index].nbytes,
                       started=started, seconds=time.time() - started)


def publish_staging(staging: Staging, results: list[ShardResult], *, force: bool = False) -> Path:
    """Write the non-weight files, then move the complete folder to ``staging.out``.

    Raises:
        FileNotFoundError: a shard is missing from the staging folder.
        OutputExistsError: ``out`` appeared meanwhile and ``force`` is False.
        OutputIsInputError: ``force`` is set and ``out`` is or contains an input.
    """
    if staging.out.exists() and not force:  # before finalizing, so the staging folder stays resumable
        raise OutputExistsError(str(staging.out))
    plan = MergePlan.model_validate_json(staging.plan_path.read_text())
    missing = [r.file for r in results if not (staging.dir / r.file).is_file()]
    if missing or len(results) != len(plan.shards):
        raise FileNotFoundError(f"{staging.dir}: shard(s) missing: {', '.join(missing) or 'results incomplete'}; run again to recompute them")
    with output_write_errors(staging.out):
        finalize(plan, staging.dir)
        shutil.rmtree(staging.results_dir)
        staging.plan_path.unlink()
        move_into_place(staging.dir, staging.out, force=force, inputs=staging.inputs)
    return staging.out
