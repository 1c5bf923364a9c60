"""The Hub model card of a merged model, and publishing the folder to the Hub.

``write_hub_card`` extends the engine's README.md (front matter + recipe) with the Hub's merge conventions:
``base_model`` lists the sources' Hub ids, ``base_model_relation: merge``, ``tags`` include ``merge``,
``mergeflow`` and the method, ``library_name: transformers`` and a ``model-index`` with the lm-eval results;
the body gains an evaluation table and a lineage table. It holds nothing run-specific (no run ids, no times),
so the same model and scores give the same card, and publishing it again makes no commit.

``publish_model`` is ``create_repo(exist_ok=True)`` + ``upload_folder``: files whose content is already on the
Hub are not sent, and an upload that changes nothing makes no commit (the head's sha comes back).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import EvalResult as HubEvalResult
from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from merge_ops import settings
from merge_ops.errors import PublishError
from tasks.evaluation import EvalResult
from tasks.lineage import Lineage, SourceRecord, collect_lineage
from tasks.retries import RETRY_DELAYS, only_transient

CARD_MARK = "<!-- mergeflow: evaluation and lineage, generated; edits below this line are replaced -->"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
UPLOAD_IGNORE = [".*", "*/.*", "*.partial"]


class PublishTarget(BaseModel):
    """Where a merged model that passed the gate is published."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo_id: str
    """``namespace/name`` on the Hub."""
    private: bool = False
    """Visibility of a repo created now; an existing repo keeps its own."""
    endpoint: str | None = None
    """Hub URL; ``settings.HF_ENDPOINT`` (HF_ENDPOINT) when None."""
    commit_message: str | None = None


class Published(BaseModel):
    repo_id: str
    commit_sha: str
    new_commit: bool
    """False when the Hub already had exactly these files (no commit was made)."""
    url: str


def _split_card(text: str) -> tuple[dict, str]:
    if text.startswith("---\n"):
        _, header, body = text.split("---\n", 2)
        return yaml.safe_load(header) or {}, body
    return {}, text


def _evaluation_section(merged: EvalResult, sources: dict[str, EvalResult], names: dict[str, str]) -> list[str]:
    columns = list(sources)
    lines = [
        "## Evaluation", "",
        f"[lm-evaluation-harness]({LM_EVAL_URL}) {merged.lm_eval_version}, each task's primary metric"
        + (f" (documents per task limited to {lim})" if (lim := _limit(merged)) is not None else "") + ".", "",
        "| task | metric | this model | " + " | ".join(f"`{names.get(c, c)}`" for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for task_name, metric in merged.primary.items():
        cells = [sources[c].scores.get(task_name) for c in columns]
        shown = " | ".join("-" if v is None else f"{v:.4f}" for v in cells)
        lines.append(f"| {task_name} | {metric} | **{merged.scores[task_name]:.4f}** | {shown} |")
    return lines


def _limit(result: EvalResult) -> str | None:
    import json

    try:
        config = json.loads(Path(result.raw_path).read_text()).get("config", {})
    except (OSError, ValueError):
        return None
    return None if config.get("limit") is None else str(config["limit"])


def _lineage_section(lineage: Lineage) -> list[str]:
    lines = ["## Lineage", "", "| role | model | requested revision | commit |", "|---|---|---|---|"]
    for s in sorted(lineage.sources, key=lambda s: not s.is_base):
        model = f"`{s.repo_id}`" if s.repo_id else f"`{s.key}` (local)"
        lines.append(f"| {'base' if s.is_base else 'source'} | {model} | {s.revision or ('main' if s.repo_id else '-')} | {f'`{s.commit_sha}`' if s.commit_sha else '-'} |")
    lines.append(f"| merged | this model ({lineage.method}) | | content sha256 `{lineage.output_hash}` |")
    return lines + ["", f"Recipe sha256 `{lineage.recipe_sha256}`."]


def hub_card(card_text: str, *, lineage: Lineage, merged: EvalResult, sources: dict[str, EvalResult] | None = None, model_name: str) -> str:
    """The engine's card ``card_text`` with Hub merge metadata, evaluation and lineage.

    Args:
        card_text: the merged folder's README.md as the engine wrote it (or as this function did: regenerated).
        lineage: sources with their Hub ids and commits, method, hashes.
        merged: the merged model's evaluation (the ``model-index``).
        sources: source key -> its evaluation, shown next to the merged model's scores.
        model_name: the ``model-index`` name (the repo's name).
    """
    meta, body = _split_card(card_text)
    body = body.split(CARD_MARK)[0].rstrip() + "\n"
    keep = {k: v for k, v in meta.items() if k not in ("base_model", "base_model_relation", "model-index", "tags", "library_name")}
    tags = list(dict.fromkeys([*(meta.get("tags") or []), "merge", "mergeflow", lineage.method]))
    hub_ids = lineage.hub_base_models
    results = [
        HubEvalResult(
            task_type="text-generation", dataset_type=task_name, dataset_name=task_name, metric_type=metric.split("/")[0],
            metric_name=metric, metric_value=round(merged.scores[task_name], 6), source_name="lm-evaluation-harness", source_url=LM_EVAL_URL,
        )
        for task_name, metric in merged.primary.items()
    ]
    data = ModelCardData(
        base_model=hub_ids or None, library_name="transformers", tags=tags, model_name=model_name, eval_results=results or None,
        **({"base_model_relation": "merge"} if hub_ids else {}), **keep,
    )
    names = {s.key: s.label for s in lineage.sources}
    extension = [CARD_MARK, "", *_evaluation_section(merged, sources or {}, names), "", *_lineage_section(lineage)]
    return f"---\n{data.to_yaml()}\n---\n{body}\n" + "\n".join(extension) + "\n"


def write_hub_card(folder: Path, *, lineage: Lineage, merged: EvalResult, sources: dict[str, EvalResult] | None = None, model_name: str | None = None) -> Path:
    """Rewrite ``folder``/README.md as the Hub card (see ``hub_card``); returns its path. Idempotent."""
    card = Path(folder) / "README.md"
    text = card.read_text() if card.is_file() else ""
    card.write_text(hub_card(text, lineage=lineage, merged=merged, sources=sources, model_name=model_name or Path(folder).name))
    return card


def publish_model(
    folder: Path, *, repo_id: str, private: bool = False, endpoint: str | None = None, commit_message: str | None = None
) -> Published:
    """Upload the model folder to ``repo_id`` (created if needed); identical content makes no new commit.

    The token comes from ``settings.hf_token()`` (HF_TOKEN or ``hf auth login``), never from an argument.

    Raises:
        PublishError: the Hub refused for good (401/403: token; 404: namespace; 400: repo id) - not retried.
        HfHubHTTPError, OSError: other failures (5xx, network), worth retrying.

    Example:
        >>> publish_model(Path("merged/ties"), repo_id="me/skills-ties").commit_sha
        '3f1c...'
    """
    api = HfApi(endpoint=endpoint or settings.HF_ENDPOINT, token=settings.hf_token())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        before = api.model_info(repo_id).sha
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message or f"Upload {Path(folder).name} with mergeflow",
            ignore_patterns=UPLOAD_IGNORE,
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (400, 401, 403, 404, 409, 422):
            raise PublishError(repo_id, status, str(err).splitlines()[0]) from err
        raise
    return Published(repo_id=repo_id, commit_sha=info.oid, new_commit=info.oid != before, url=str(url))


@task(name="publish_model", task_run_name="publish-{target.repo_id}", retries=3, retry_delay_seconds=RETRY_DELAYS,
      retry_jitter_factor=0.5, retry_condition_fn=only_transient, cache_policy=NO_CACHE, persist_result=False)
def publish_model_task(folder: Path, target: PublishTarget) -> Published:
    """Publish the merged folder (card included) to the Hub; returns the commit sha."""
    published = publish_model(folder, repo_id=target.repo_id, private=target.private, endpoint=target.endpoint, commit_message=target.commit_message)
    state = "new commit" if published.new_commit else "unchanged, no new commit"
    get_run_logger().info("published %s to %s at %s (%s)", folder, published.repo_id, published.commit_sha, state)
    return published


@task(name="write_model_card", cache_policy=NO_CACHE, persist_result=False)
def write_card_task(
    merged_dir: Path, recipe: Path, sources: list[SourceRecord], merged: EvalResult, source_evals: dict[str, EvalResult], model_name: str
) -> Lineage:
    """Write the Hub card into the merged folder; returns the lineage of the final folder (its DVC hash covers the card)."""
    preliminary = collect_lineage(merged_dir, recipe=recipe, sources=sources)
    write_hub_card(merged_dir, lineage=preliminary, merged=merged, sources=source_evals, model_name=model_name)
    return collect_lineage(merged_dir, recipe=recipe, sources=sources)
