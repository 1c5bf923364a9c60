"""Model sources: a recipe reference (local folder or ``org/repo@revision``) resolved to a commit, then local files.

``resolve_source`` pins a Hub reference to its commit sha without downloading anything; ``read_source_headers``
reads its config, card and safetensors headers (ranged reads on the Hub); ``download_source`` fetches that exact
commit's weights, configs and tokenizer files with ``snapshot_download``. Local folders pass through unchanged.
One ``Source`` record follows a model from the recipe to the lineage of what was merged from it. The token comes from ``settings.hf_token()`` inside these functions, so it is
never an argument, a log line or a Prefect record.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, NotASafetensorsRepoError
from pydantic import BaseModel

from merge_ops.errors import ModelNotFoundError, RecipeError
from merge_ops.headers import ModelHeaders, card_base_model, ordered_tensors, read_local_headers
from merge_ops.recipe import ModelRef
from mergeflow import settings
from mergeflow.hub import hub_error

ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",  # config, generation config, safetensors index, tokenizer.json/_config, vocab.json, ...
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "README.md",  # the model card: its base_model is part of the compatibility check
)
"""What is downloaded by default. Pickle-based and other formats (.bin, .pt, .pth, .ckpt, .gguf) never are,
unless named in ``extra_patterns``."""


class Source(BaseModel):
    """A recipe's model pinned to what is merged: a Hub repo at a commit, or a local folder.

    ``repo_id``/``commit_sha`` are None for local folders; ``path`` is None for a Hub model not yet downloaded.
    """

    key: str
    """The reference as written in the recipe (``org/repo``, ``org/repo@rev``, or a path)."""
    repo_id: str | None = None
    revision: str | None = None
    """The revision the recipe asked for (None: the default branch)."""
    commit_sha: str | None = None
    """The commit that is merged (Hub sources)."""
    path: Path | None = None
    is_base: bool = False

    @property
    def label(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.commit_sha[:12]}" if self.commit_sha else self.repo_id
        return self.key


def _local_folder(ref: ModelRef, base_dir: Path) -> Path | None:
    return next((c.resolve() for c in (Path(ref.path), base_dir / ref.path) if c.is_dir()), None)


def resolve_source(ref: ModelRef, *, base_dir: Path, endpoint: str | None = None) -> Source:
    """Pin ``ref`` to a commit (Hub) or a folder (local), downloading nothing.

    Args:
        ref: the recipe's reference, ``path`` or ``org/repo@revision``.
        base_dir: folder that relative local paths are tried against (the recipe's folder), after cwd.
        endpoint: Hub URL; ``settings.HF_ENDPOINT`` when None.

    Raises:
        ModelNotFoundError: neither a local folder nor a Hub repo/revision.
        HubAccessError: the Hub refused the token.

    Example:
        >>> resolve_source(ModelRef.model_validate("org/model@main"), base_dir=Path("."))
        Source(key='org/model@main', repo_id='org/model', revision='main', commit_sha='3f1c...', path=None)
    """
    if ref.adapter:
        raise RecipeError([f"{ref.key}: LoRA adapters (BASE+ADAPTER) are applied by `mergeflow merge` and `mergeflow plan` for now; "
                           "the pipeline (`mergeflow run`, `check`, `sweep`, the DVC stages) does not fetch adapters yet"])
    folder = _local_folder(ref, base_dir)
    if folder is not None:
        return Source(key=ref.key, path=folder)
    if ref.path.count("/") != 1 or ref.path.startswith((".", "/")):
        raise ModelNotFoundError(ref.key, "not a local folder, nor a Hub repo id of the form org/name")
    api = HfApi(endpoint=endpoint or settings.HF_ENDPOINT, token=settings.hf_token())
    try:
        info = api.model_info(ref.path, revision=ref.revision)
    except HfHubHTTPError as err:
        raise hub_error(ref.path, ref.revision, err) from err
    return Source(key=ref.key, repo_id=ref.path, revision=ref.revision, commit_sha=info.sha)


def download_source(
    source: Source,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    extra_patterns: list[str] | None = None,
) -> Source:
    """Download the pinned commit of a Hub source (weights, configs, tokenizer, card); local sources pass through.

    Args:
        source: from ``resolve_source``.
        endpoint: Hub URL; ``settings.HF_ENDPOINT`` when None.
        cache_dir: download cache; ``settings.HF_CACHE_DIR``, else huggingface_hub's own, when None.
        extra_patterns: more glob patterns to fetch, e.g. ``["*.bin"]`` (never fetched otherwise).

    Raises:
        ModelNotFoundError, HubAccessError: permanent; other errors (network) are worth retrying.
    """
    if source.repo_id is None:
        return source
    try:
        folder = snapshot_download(
            source.repo_id,
            revision=source.commit_sha,
            allow_patterns=[*ALLOW_PATTERNS, *(extra_patterns or [])],
            cache_dir=cache_dir or settings.HF_CACHE_DIR,
            endpoint=endpoint or settings.HF_ENDPOINT,
            token=settings.hf_token(),
        )
    except HfHubHTTPError as err:
        raise hub_error(source.repo_id, source.commit_sha, err) from err
    return source.model_copy(update={"path": Path(folder)})


def read_source_headers(source: Source, *, endpoint: str | None = None, cache_dir: Path | None = None) -> ModelHeaders:
    """config.json, card base_model and tensor headers of a local folder or a pinned Hub commit (no weights).

    Raises:
        ModelNotFoundError: no config.json or no safetensors weights.
        HubAccessError: the Hub refused the token.
    """
    if source.path is not None:
        return read_local_headers(source.key, source.path)
    assert source.repo_id is not None and source.commit_sha is not None
    url, token, cache = endpoint or settings.HF_ENDPOINT, settings.hf_token(), cache_dir or settings.HF_CACHE_DIR

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(source.repo_id, filename, revision=source.commit_sha, endpoint=url, token=token, cache_dir=cache))  # type: ignore[arg-type]

    try:
        config_file = fetch("config.json")
        try:
            readme: Path | None = fetch("README.md")
        except EntryNotFoundError:
            readme = None
        api = HfApi(endpoint=url, token=token)
        meta = api.get_safetensors_metadata(source.repo_id, revision=source.commit_sha)
    except EntryNotFoundError:
        raise ModelNotFoundError(source.key, "the repo has no config.json; is it a transformers model?") from None
    except NotASafetensorsRepoError:
        raise ModelNotFoundError(source.key, "the repo has no .safetensors weights; mergeflow merges safetensors only") from None
    except HfHubHTTPError as err:
        raise hub_error(source.repo_id, source.commit_sha, err) from err
    files = [(f, {n: (t.dtype, tuple(t.shape)) for n, t in meta.files_metadata[f].tensors.items()}) for f in dict.fromkeys(meta.weight_map.values())]
    return ModelHeaders(
        key=source.key, config=json.loads(config_file.read_text()), tensors=ordered_tensors(files),
        card_base_model=card_base_model(readme),
    )


def local_headers(headers: Sequence[ModelHeaders], sources: Sequence[Source]) -> dict[str, ModelHeaders]:
    """Ref key -> the headers of each model, pointing at its downloaded folder."""
    folders: Mapping[str, Path | None] = {s.key: s.path for s in sources}
    return {h.key: h.at(folder) if (folder := folders.get(h.key)) is not None else h for h in headers}
