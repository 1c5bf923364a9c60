"""Model cards of merged models on huggingface_hub's ModelCard and ModelCardData: the one builder of the engine's
card (written with every merge) and of the publish step's card (mergeflow.card adds evaluation and lineage).

The Hub's conventions for merges: ``base_model`` lists Hub repo ids only (a local folder means nothing on the
Hub; the card's body names local sources), ``base_model_relation: merge``, ``tags`` with ``merge``, ``mergeflow``
and the method, ``library_name: transformers``. A merged LoRA adapter follows the adapter conventions instead:
``library_name: peft``, ``base_model`` the one base it adapts, ``base_model_relation: adapter``, tags ``lora``
and ``peft``.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from merge_ops.recipe import ModelRef


def hub_id(key: str, folder: str | Path | None) -> str | None:
    """The Hub repo id of a source read from ``folder``: its reference's repo id when the folder is a snapshot of
    that repo in a Hugging Face cache (``.../models--org--name/snapshots/<commit>``); None for a local folder.

    Example:
        >>> hub_id("demo/add@main", "/cache/models--demo--add/snapshots/0123abcd")
        'demo/add'
        >>> hub_id("demo-family/add", "/work/demo-family/add") is None
        True
    """
    if folder is None:
        return None
    path = ModelRef.model_validate(key).path
    snapshot = Path(folder)
    return path if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name == "models--" + path.replace("/", "--") else None


def reference_hub_id(key: str) -> str | None:
    """The Hub repo id of a reference the merge never read (the base of an adapter merge): ``org/name`` when it
    has that form and names no local folder; None otherwise."""
    path = ModelRef.model_validate(key).path
    return path if path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).is_dir() else None


def card_data(*, method: str, hub_ids: Iterable[str], adapter: bool = False, tags: Iterable[str] = (), **fields: Any) -> ModelCardData:
    """The card's metadata by the Hub's merge (or, for a merged LoRA adapter, adapter) conventions.

    Args:
        method: the merge method (or adapter combination), a tag.
        hub_ids: Hub repo ids of the sources, the base first; local folders left out. An adapter keeps the first.
        adapter: the card of a merged LoRA adapter.
        tags: more tags, before the ones added here.
        fields: other ModelCardData fields (``model_name``, ``eval_results``, a source card's own keys).
    """
    ids = list(dict.fromkeys(hub_ids))
    own = ("merge", "mergeflow", method, *(("lora", "peft") if adapter else ()))
    return ModelCardData(
        base_model=(ids[0] if adapter else ids) if ids else None, base_model_relation=("adapter" if adapter else "merge") if ids else None,
        library_name="peft" if adapter else "transformers", tags=list(dict.fromkeys([*tags, *own])), **fields,
    )


def render_card(data: ModelCardData, body: str) -> str:
    """README.md text: ``data`` as the YAML front matter, then the Markdown ``body``."""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def read_card(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of README.md text; ({}, text) without front matter."""
    if not text.startswith("---\n"):
        return {}, text
    card = ModelCard(text)
    return card.data.to_dict(), card.text  # type: ignore[no-untyped-call]  # huggingface_hub leaves to_dict untyped


def sources_section(heading: str, sources: dict[str, str | None], notes: dict[str, str] | None = None) -> str:
    """``## heading`` and one line per source: ``org/name`` for a Hub model, ``folder (local folder)`` otherwise.

    Args:
        sources: reference -> its Hub repo id, or None for a local folder.
        notes: reference -> text added to its line, e.g. its weight.
    """
    notes = notes or {}
    lines = [f"- `{key}`" + ("" if repo else " (local folder)") + (f" {notes[key]}" if key in notes else "") for key, repo in sources.items()]
    return f"## {heading}\n\n" + "\n".join(lines) + "\n"
