"""Where a merged model comes from: its sources at their commits, the recipe, the code and the run that made it.

``collect_lineage`` gathers it once per merged artefact; the model card's lineage table, the MLflow tags of the
run and of the registered model version are all written from the same ``Lineage``.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from pydantic import BaseModel

from merge_ops import settings
from merge_ops.methods.registry import get_method
from merge_ops.recipe import load_recipe
from tasks.evaluation import model_content_hash


class SourceRecord(BaseModel):
    """One model of the recipe: a Hub repo pinned to a commit, or a local folder."""

    key: str
    """The reference as written in the recipe (``org/repo``, ``org/repo@rev``, or a path)."""
    repo_id: str | None = None
    revision: str | None = None
    """The revision the recipe asked for (None: the default branch)."""
    commit_sha: str | None = None
    """The commit that was merged (Hub sources)."""
    path: str | None = None
    is_base: bool = False

    @property
    def label(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.commit_sha[:12]}" if self.commit_sha else self.repo_id
        return self.key


class Lineage(BaseModel):
    method: str
    recipe_sha256: str
    base_model: str | None
    sources: list[SourceRecord]
    output_hash: str
    """``model_content_hash`` of the merged folder: weights, config and tokenizer files (not the card)."""
    output_bytes: int
    dvc_hash: str | None = None
    """DVC's md5 of the merged folder (``<md5>.dir``), when run as a DVC stage (``settings.DVC_STAGE``)."""
    dvc_stage: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    prefect_flow_run_id: str | None = None
    prefect_root_flow_run_id: str | None = None

    @property
    def hub_base_models(self) -> list[str]:
        """Hub repo ids of every source (the base first), for the card's ``base_model``."""
        ids = [s.repo_id for s in sorted(self.sources, key=lambda s: not s.is_base) if s.repo_id]
        return list(dict.fromkeys(ids))


def git_state(cwd: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the git repository around ``cwd``; (None, None) outside one."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def dvc_hash(folder: Path) -> str:
    """The hash ``dvc add``/``dvc repro`` record for ``folder`` (``<md5>.dir``), computed without a DVC repo or cache."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/mergeflow-staging")
    _, _, obj = build(staging, str(Path(folder).resolve()), LocalFileSystem(), "md5", dry_run=True)
    return str(obj.hash_info.value)


def _prefect_ids() -> tuple[str | None, str | None]:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:
        return None, None
    return str(run_id), str(flow_run.get_root_flow_run_id() or run_id)


def collect_lineage(merged_dir: Path, *, recipe: Path, sources: list[SourceRecord]) -> Lineage:
    """The lineage of the merged model in ``merged_dir``, made from ``recipe`` over ``sources``.

    Call it after the model card is final: the DVC hash covers every file of the folder.

    Args:
        merged_dir: the merged model folder.
        recipe: the recipe file (its sha256 is the plan's ``recipe_sha256``; the base and method come from it;
            the git commit is that of the repository holding it, else of the working directory).
        sources: every model of the recipe; ``is_base`` is set here from the recipe.
    """
    parsed = load_recipe(Path(recipe))
    base = parsed.base_model.key if parsed.base_model else None
    records = [s.model_copy(update={"is_base": s.key == base}) for s in sources]
    git_commit, git_dirty = git_state(Path(recipe).resolve().parent)
    if git_commit is None:  # a recipe outside any repository: the code's repository, where the run started
        git_commit, git_dirty = git_state(None)
    flow_run_id, root_id = _prefect_ids()
    under_dvc = settings.DVC_STAGE is not None
    return Lineage(
        method=get_method(parsed.merge_method).name,
        recipe_sha256=hashlib.sha256(Path(recipe).read_text().encode()).hexdigest(),  # as MergePlan.recipe_sha256
        base_model=base,
        sources=records,
        output_hash=model_content_hash(merged_dir),
        output_bytes=sum(p.stat().st_size for p in Path(merged_dir).rglob("*") if p.is_file()),
        dvc_hash=dvc_hash(merged_dir) if under_dvc else None,
        dvc_stage=settings.DVC_STAGE,
        git_commit=git_commit,
        git_dirty=git_dirty,
        prefect_flow_run_id=flow_run_id,
        prefect_root_flow_run_id=root_id,
    )
