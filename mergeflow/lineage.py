"""Where a merged model comes from: its sources at their commits, the recipe, the code and the run that made it.

``collect_lineage`` gathers it once per merged artefact; the model card's lineage table, the MLflow tags of the
run and of the registered model version are all written from the same ``Lineage``; ``finish_lineage`` adds
the size (and under DVC the hash) of the final folder once the card is in it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from pydantic import BaseModel

from merge_ops.methods.registry import get_method
from merge_ops.recipe import Recipe
from mergeflow import settings
from mergeflow.sources import Source


class Lineage(BaseModel):
    method: str
    recipe_sha256: str
    base_model: str | None
    sources: list[Source]
    output_hash: str
    """``model_content_hash`` of the merged folder: weights, config and tokenizer files (not the card)."""
    output_bytes: int = 0
    """Bytes of the finished folder, card included (``finish_lineage``)."""
    dvc_hash: str | None = None
    """DVC's md5 of the merged folder, card included (``<md5>.dir``), when run as a DVC stage (``settings.DVC_STAGE``)."""
    dvc_stage: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    prefect_flow_run_id: str | None = None
    prefect_root_flow_run_id: str | None = None

    @property
    def hub_base_models(self) -> list[str]:
        """Hub repo ids of every source and adapter (the base first), for the card's ``base_model``."""
        ordered = sorted(self.sources, key=lambda s: not s.is_base)
        ids = [r.repo_id for s in ordered for r in (s, *([s.adapter] if s.adapter else [])) if r.repo_id]
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

    staging = HashFileDB(MemoryFileSystem(), "/mergeflow-staging")  # type: ignore[no-untyped-call]
    _, _, obj = build(staging, str(Path(folder).resolve()), LocalFileSystem(), "md5", dry_run=True)  # type: ignore[no-untyped-call]
    return str(obj.hash_info.value)


def collect_lineage(
    *, recipe: Recipe, sources: list[Source], output_hash: str, flow_run_id: str | None = None,
    root_flow_run_id: str | None = None,
) -> Lineage:
    """The lineage of a merged model made from ``recipe`` over ``sources``.

    Call ``finish_lineage`` once the folder is final (its card written).

    Args:
        recipe: the recipe as loaded (its sha256 is the plan's ``recipe_sha256``; the git commit is that of the
            repository holding its file, else of the working directory).
        sources: every model of the recipe; ``is_base`` is set here from the recipe.
        output_hash: ``model_content_hash`` of the merged folder (its evaluation computed it already).
        flow_run_id, root_flow_run_id: the Prefect run that made it, when there is one.
    """
    base = recipe.base_model.key if recipe.base_model else None
    records = [s.model_copy(update={"is_base": s.key == base}) for s in sources]
    git_commit, git_dirty = git_state(recipe.base_dir.resolve()) if recipe.path else (None, None)
    if git_commit is None:  # a recipe outside any repository: the code's repository, where the run started
        git_commit, git_dirty = git_state(None)
    return Lineage(
        method=get_method(recipe.merge_method).name,
        recipe_sha256=recipe.sha256,
        base_model=base,
        sources=records,
        output_hash=output_hash,
        dvc_stage=settings.DVC_STAGE,
        git_commit=git_commit,
        git_dirty=git_dirty,
        prefect_flow_run_id=flow_run_id,
        prefect_root_flow_run_id=root_flow_run_id,
    )


def finish_lineage(lineage: Lineage, merged_dir: Path) -> Lineage:
    """``lineage`` with the size of the finished folder (card written) and, under DVC, its DVC hash."""
    return lineage.model_copy(update={
        "output_bytes": sum(p.stat().st_size for p in Path(merged_dir).rglob("*") if p.is_file()),
        "dvc_hash": dvc_hash(merged_dir) if lineage.dvc_stage else None,
    })
