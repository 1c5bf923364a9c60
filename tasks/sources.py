"""Model sources: a recipe reference (local folder or ``org/repo@revision``) resolved to a commit, then local files.

``resolve_source`` pins a Hub reference to its commit sha without downloading anything; ``download_source``
fetches that exact commit's weights, configs and tokenizer files with ``snapshot_download``. Local folders
pass through both unchanged. The token comes from ``settings.hf_token()`` inside these functions, so it is
never an argument, a log line or a Prefect record.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel

from merge_ops import settings
from merge_ops.errors import HubAccessError, ModelNotFoundError
from merge_ops.recipe import ModelRef
from tasks.retries import RETRY_DELAYS, only_transient

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


class ResolvedSource(BaseModel):
    """A recipe's model reference pinned to what will be merged.

    ``repo_id``/``commit_sha`` are None for local folders; ``path`` is None for a Hub model not yet downloaded.
    """

    key: str
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    path: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.commit_sha[:12]}" if self.repo_id and self.commit_sha else str(self.path)


def _local_folder(ref: ModelRef, base_dir: Path) -> Path | None:
    return next((c.resolve() for c in (Path(ref.path), base_dir / ref.path) if c.is_dir()), None)


def hub_error(repo_id: str, revision: str | None, err: Exception) -> Exception:
    """Permanent Hub errors as mergeflow errors (not retried); anything else is returned unchanged."""
    if isinstance(err, GatedRepoError):
        return HubAccessError(repo_id, err.response.status_code if err.response is not None else None)
    if isinstance(err, RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id}@{revision}", "the Hub has no such revision; check the branch, tag or commit")
    if isinstance(err, RepositoryNotFoundError):
        return ModelNotFoundError(repo_id, "not a local folder, and the Hub has no such repo (or it is private: set HF_TOKEN)")
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    if status in (401, 403):
        return HubAccessError(repo_id, status)
    return err


def resolve_source(ref: ModelRef, *, base_dir: Path, endpoint: str | None = None) -> ResolvedSource:
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
        ResolvedSource(key='org/model@main', repo_id='org/model', revision='main', commit_sha='3f1c...', path=None)
    """
    folder = _local_folder(ref, base_dir)
    if folder is not None:
        return ResolvedSource(key=ref.key, path=folder)
    if ref.path.count("/") != 1 or ref.path.startswith((".", "/")):
        raise ModelNotFoundError(ref.key, "not a local folder, nor a Hub repo id of the form org/name")
    api = HfApi(endpoint=endpoint or settings.HF_ENDPOINT, token=settings.hf_token())
    try:
        info = api.model_info(ref.path, revision=ref.revision)
    except HfHubHTTPError as err:
        raise hub_error(ref.path, ref.revision, err) from err
    return ResolvedSource(key=ref.key, repo_id=ref.path, revision=ref.revision, commit_sha=info.sha)


def download_source(
    source: ResolvedSource,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    extra_patterns: list[str] | None = None,
) -> ResolvedSource:
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


@task(name="resolve_model", task_run_name="resolve-{ref}", retries=3, retry_delay_seconds=RETRY_DELAYS,
      retry_jitter_factor=0.5, retry_condition_fn=only_transient, cache_policy=NO_CACHE, persist_result=False)
def resolve_model(ref: ModelRef, recipe_path: Path, endpoint: str | None = None) -> ResolvedSource:
    """Pin a model reference to a commit sha (Hub) or a folder (local; relative paths: cwd, then the recipe's folder)."""
    source = resolve_source(ref, base_dir=Path(recipe_path).parent, endpoint=endpoint)
    get_run_logger().info("%s -> %s", ref.key, source.label)
    return source


@task(name="download_model", task_run_name="download-{source.key}", retries=3, retry_delay_seconds=RETRY_DELAYS,
      retry_jitter_factor=0.5, retry_condition_fn=only_transient, cache_policy=NO_CACHE, persist_result=False)
def download_model(
    source: ResolvedSource, endpoint: str | None = None, cache_dir: Path | None = None, extra_patterns: list[str] | None = None
) -> ResolvedSource:
    """Download a Hub model at its pinned commit; local folders pass through."""
    downloaded = download_source(source, endpoint=endpoint, cache_dir=cache_dir, extra_patterns=extra_patterns)
    if source.repo_id is not None:
        get_run_logger().info("downloaded %s to %s", source.label, downloaded.path)
    return downloaded
