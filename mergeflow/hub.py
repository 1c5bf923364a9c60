"""The Hub client's errors as mergeflow errors, and publishing a model folder to the Hub.

``publish_model`` is ``create_repo(exist_ok=True)`` + ``upload_folder``: files whose content is already on the
Hub are not sent, and an upload that changes nothing makes no commit (the head's sha comes back). The token
comes from ``settings.hf_token()`` inside the functions, so it is never an argument, a log line or a record.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from pydantic import BaseModel, ConfigDict

from merge_ops.errors import ModelNotFoundError
from mergeflow import settings
from mergeflow.errors import HubAccessError, PublishError

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
