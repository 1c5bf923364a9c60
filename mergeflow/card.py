"""The Hub model card of a merged model.

``write_hub_card`` extends the engine's README.md (front matter + recipe) with evaluation and lineage, through
the engine's own card builder (``merge_ops.card``, on huggingface_hub's ModelCard/ModelCardData): ``base_model``
lists the sources' Hub ids (local sources are named in the body only), ``base_model_relation: merge``, ``tags``
include ``merge``, ``mergeflow`` and the method, ``library_name: transformers`` and a ``model-index`` with the
lm-eval results; the body gains an evaluation table (± standard errors) and a lineage table. A merged LoRA
adapter (a folder with adapter_config.json) follows the Hub's adapter conventions instead: ``library_name: peft``,
``base_model`` the base it adapts, ``base_model_relation: adapter``, tags ``lora`` and ``peft``. It holds nothing
run-specific (no run ids, no times), so the same model and scores give the same card, and publishing it again
makes no commit.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult as HubEvalResult

from merge_ops.card import card_data, read_card, render_card
from merge_ops.lora import ADAPTER_CONFIG
from mergeflow.evaluation import EvalResult, score_cell
from mergeflow.lineage import Lineage

CARD_MARK = "<!-- mergeflow: evaluation and lineage, generated; edits below this line are replaced -->"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def _evaluation_section(merged: EvalResult, sources: dict[str, EvalResult], names: dict[str, str]) -> list[str]:
    columns = list(sources)
    lines = [
        "## Evaluation", "",
        f"[lm-evaluation-harness]({LM_EVAL_URL}) {merged.lm_eval_version}, each task's primary metric"
        + (f" (documents per task limited to {lim})" if (lim := _limit(merged)) is not None else "")
        + (", ± its standard error as lm-eval computes it" if merged.stderrs else "") + ".", "",
        "| task | metric | this model | " + " | ".join(f"`{names.get(c, c)}`" for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for task_name, metric in merged.primary.items():
        shown = " | ".join(score_cell(sources[c], task_name) for c in columns)
        lines.append(f"| {task_name} | {metric} | **{score_cell(merged, task_name)}** | {shown} |")
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
    for source in sorted(lineage.sources, key=lambda s: not s.is_base):
        rows = [(source, "base" if source.is_base else "source"), *([(source.adapter, "LoRA adapter on the row above")] if source.adapter else [])]
        for s, role in rows:
            model = f"`{s.repo_id}`" if s.repo_id else f"`{s.key.split('+')[0] if s.adapter else s.key}` (local)"
            lines.append(f"| {role} | {model} | {s.revision or ('main' if s.repo_id else '-')} | {f'`{s.commit_sha}`' if s.commit_sha else '-'} |")
    lines.append(f"| merged | this model ({lineage.method}) | | content sha256 `{lineage.output_hash}` |")
    return lines + ["", f"Recipe sha256 `{lineage.recipe_sha256}`."]


def hub_card(
    card_text: str, *, lineage: Lineage, merged: EvalResult, sources: dict[str, EvalResult] | None = None, model_name: str, adapter: bool = False,
) -> str:
    """The engine's card ``card_text`` with Hub merge metadata, evaluation and lineage.

    Args:
        card_text: the merged folder's README.md as the engine wrote it (or as this function did: regenerated).
        lineage: sources with their Hub ids and commits, method, hashes.
        merged: the merged model's evaluation (the ``model-index``).
        sources: source key -> its evaluation, shown next to the merged model's scores.
        model_name: the ``model-index`` name (the repo's name).
        adapter: the card of a merged LoRA adapter (adapter conventions), not of a merged model.
    """
    meta, body = read_card(card_text)
    body = body.split(CARD_MARK)[0].rstrip() + "\n"
    keep = {k: v for k, v in meta.items() if k not in ("base_model", "base_model_relation", "model-index", "eval_results", "model_name", "tags", "library_name")}
    hub_ids = [s.repo_id for s in lineage.sources if s.is_base and s.repo_id] if adapter else lineage.hub_base_models
    results = [
        HubEvalResult(
            task_type="text-generation", dataset_type=task_name, dataset_name=task_name, metric_type=metric.split("/")[0],
            metric_name=metric, metric_value=round(merged.scores[task_name], 6), source_name="lm-evaluation-harness", source_url=LM_EVAL_URL,
        )
        for task_name, metric in merged.primary.items()
    ]
    data = card_data(method=lineage.method, hub_ids=hub_ids, adapter=adapter, tags=meta.get("tags") or [], model_name=model_name,
                     eval_results=results or None, **keep)
    names = {s.key: s.label for s in lineage.sources}
    extension = [CARD_MARK, "", *_evaluation_section(merged, sources or {}, names), "", *_lineage_section(lineage)]
    return render_card(data, f"{body}\n" + "\n".join(extension) + "\n")


def write_hub_card(folder: Path, *, lineage: Lineage, merged: EvalResult, sources: dict[str, EvalResult] | None = None, model_name: str | None = None) -> Path:
    """Rewrite ``folder``/README.md as the Hub card (see ``hub_card``; adapter conventions for an adapter folder); returns its path. Idempotent."""
    card = Path(folder) / "README.md"
    text = card.read_text() if card.is_file() else ""
    adapter = (Path(folder) / ADAPTER_CONFIG).is_file()
    card.write_text(hub_card(text, lineage=lineage, merged=merged, sources=sources, model_name=model_name or Path(folder).name, adapter=adapter))
    return card
