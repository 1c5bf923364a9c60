"""Publishing a model folder to the Hub (its requests bounded and its errors mapped by ``mergeflow.hub_client``).

``publish_model`` is ``create_repo(exist_ok=True)`` + ``upload_folder``: files whose content is already on the
Hub are not sent, and an upload that changes nothing makes no commit (the head's sha comes back). The token
comes from ``settings.hf_token()`` inside the functions, so it is never an argument, a log line or a record.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from pydantic import BaseModel, ConfigDict

from merge_ops.errors import MergeflowError
from mergeflow import settings
from mergeflow.errors import PublishError
from mergeflow.hub_client import hub_errors, repo_id_problem

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


def publish_model(
    folder: Path, *, repo_id: str, private: bool = False, endpoint: str | None = None, commit_message: str | None = None
) -> Published:
    """Upload the model folder to ``repo_id`` (created if needed); identical content makes no new commit.

    The token comes from ``settings.hf_token()`` (HF_TOKEN or ``hf auth login``), never from an argument.

    Raises:
        PublishError: not a repo id ``namespace/name`` (before any request), or the Hub refused for good (401/403: token;
            404: namespace; 400: repo id) - not retried.
        HubError: a failed request (no answer within ``settings.HUB_TIMEOUT``, 5xx), worth retrying when ``transient``.

    Example:
        >>> publish_model(Path("merged/ties"), repo_id="me/skills-ties").commit_sha
        '3f1c...'
    """
    problem = repo_id_problem(repo_id)
    if problem:
        raise PublishError(repo_id, None, problem)
    api = HfApi(endpoint=endpoint or settings.HF_ENDPOINT, token=settings.hf_token())
    try:
        with hub_errors(repo_id):
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            before = api.model_info(repo_id, timeout=settings.HUB_TIMEOUT).sha
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message or f"Upload {Path(folder).name} with mergeflow",
                ignore_patterns=UPLOAD_IGNORE,
            )
    except MergeflowError as err:
        http = err.__cause__
        if not isinstance(http, HfHubHTTPError):  # no answer, 5xx, not JSON: the HubError as it is
            raise
        status = http.response.status_code if http.response is not None else None  # the Hub refused: token, namespace, repo id
        raise PublishError(repo_id, status, str(http).splitlines()[0][:200]) from err
    return Published(repo_id=repo_id, commit_sha=info.oid, new_commit=info.oid != before, url=str(url))
