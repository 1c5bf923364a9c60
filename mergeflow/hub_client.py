"""How mergeflow's Hub calls go out and how their failures come back: bounded in time, retried in one place, one line.

``hub_errors`` wraps every call into huggingface_hub. It installs (once, through huggingface_hub's own
``set_client_factory``) an httpx client whose transport caps every request's timeouts at ``settings.HUB_TIMEOUT``,
including the calls that huggingface_hub makes without a timeout or with its own 60 s one. A transient failure (no
answer in time, no connection, a connection cut mid-answer, 5xx, 408, 429) is raised by the transport at once as a
transient ``HubError``, so huggingface_hub's internal retry loops (up to six tries with sleeps) never run: the network
tasks retry instead, a bounded number of times with backoff (``tasks/retries.py``). Everything else the client raises
becomes a mergeflow error that is not retried (401/403, 404, other 4xx, answers that are not JSON). Messages carry
the request's method, host and path, never its headers (the token) or query string (signed URLs).

Downloads that go through hf_xet (Xet storage) use its own client, outside this transport.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import set_client_factory
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._http import hf_request_event_hook
from huggingface_hub.utils._validators import validate_repo_id

from merge_ops.errors import MergeflowError, ModelNotFoundError
from mergeflow import settings
from mergeflow.errors import HubAccessError, HubError

RETRY_STATUS = frozenset({408, 429})
"""Answers below 500 that are worth retrying (timeout, rate limit); every 5xx is too."""
_FIX_ENDPOINT = "check HF_ENDPOINT (a Hub-compatible server) and the network"


def repo_id_problem(repo_id: str) -> str | None:
    """What makes ``repo_id`` no Hub repo id ``namespace/name`` (huggingface_hub's own rules), or None; no request made.

    Example:
        >>> repo_id_problem("a/b/c")
        'a Hub repo id is namespace/name'
    """
    if repo_id.count("/") != 1:
        return "a Hub repo id is namespace/name"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err).split(":")[0].rstrip(".")[:200]
    return None


def _request_name(request: httpx2.Request) -> str:
    """``GET http://host:port/path``: no query string (signed URLs), no headers (the token)."""
    url = request.url
    return f"Hub request {request.method} {url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


def _transport_failure(request: httpx2.Request, err: httpx2.TransportError) -> HubError:
    what = _request_name(request)
    if isinstance(err, httpx2.TimeoutException):
        return HubError(what, f"no answer within {settings.HUB_TIMEOUT:g} s", f"{_FIX_ENDPOINT}, or raise MERGEFLOW_HUB_TIMEOUT (seconds)", transient=True)
    if isinstance(err, httpx2.ConnectError):
        return HubError(what, f"cannot connect ({err or type(err).__name__})", _FIX_ENDPOINT, transient=True)
    if isinstance(err, (httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return HubError(what, f"the connection broke off mid-answer ({err or type(err).__name__})", _FIX_ENDPOINT, transient=True)
    return HubError(what, f"cannot be sent ({type(err).__name__}: {err})", _FIX_ENDPOINT, transient=False)


class _AnswerStream(httpx2.SyncByteStream):
    """An answer's body whose read failures (a stall past the timeout, a cut connection) are ``HubError``s."""

    def __init__(self, stream: httpx2.SyncByteStream, request: httpx2.Request) -> None:
        self.stream, self.request = stream, request

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.stream
        except httpx2.TransportError as err:
            raise _transport_failure(self.request, err) from None

    def close(self) -> None:
        self.stream.close()


class HubTransport(httpx2.HTTPTransport):
    """httpx's transport with every timeout capped at ``settings.HUB_TIMEOUT`` and transient failures raised at once."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        limit = settings.HUB_TIMEOUT
        asked = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: limit if asked.get(k) is None else min(asked[k], limit) for k in ("connect", "read", "write", "pool")}
        try:
            response = super().handle_request(request)
        except httpx2.TransportError as err:
            raise _transport_failure(request, err) from None
        if response.status_code >= 500 or response.status_code in RETRY_STATUS:
            response.close()
            raise HubError(_request_name(request), f"the server answered {response.status_code} {response.reason_phrase}".rstrip(),
                           "the Hub is failing or rate-limiting: try again later, " + _FIX_ENDPOINT, transient=True)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(response.status_code, headers=response.headers, stream=_AnswerStream(response.stream, request),
                               extensions=response.extensions)


def _bounded_client() -> httpx2.Client:
    """huggingface_hub's default client (its hook: offline mode, request ids) on the bounded transport."""
    return httpx2.Client(event_hooks={"request": [hf_request_event_hook]}, transport=HubTransport(), follow_redirects=True,
                         timeout=None)  # None: the transport's limit, read per request


_installed = threading.Lock()
_INSTALLED: list[bool] = []


def use_bounded_client() -> None:
    """Make huggingface_hub's shared client the bounded one (once per process; it reads the timeout per request)."""
    with _installed:
        if not _INSTALLED:
            set_client_factory(_bounded_client)
            _INSTALLED.append(True)


def _own_error(err: BaseException) -> MergeflowError | None:
    """A mergeflow error (the transport's) that ``err`` is or wraps: huggingface_hub wraps some, e.g. an LFS upload's."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, MergeflowError):
        cause = cause.__cause__
    return cause


def hub_error(repo_id: str, revision: str | None, err: Exception) -> Exception:
    """A failure of huggingface_hub as a mergeflow error: mergeflow's own (also when wrapped) pass through; 401/403 ``HubAccessError``;
    a missing repo or revision ``ModelNotFoundError``; another refusal, offline mode, or an answer that is not a Hub's
    (not JSON, no X-Repo-Commit) a permanent ``HubError``; a missing file and anything else are returned unchanged."""
    own = _own_error(err)
    if own is not None:
        return own
    if isinstance(err, RemoteEntryNotFoundError):  # a file the commit lacks: the caller says which and what it means
        return err
    if isinstance(err, GatedRepoError):
        return HubAccessError(repo_id, err.response.status_code if err.response is not None else None)
    if isinstance(err, RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id}@{revision}", "the Hub has no such revision; check the branch, tag or commit")
    if isinstance(err, RepositoryNotFoundError):
        return ModelNotFoundError(repo_id, "not a local folder, and the Hub has no such repo (or it is private: set HF_TOKEN)")
    where = f"the Hub's answer about {repo_id}" + (f"@{revision}" if revision else "")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            return HubAccessError(repo_id, status)
        return HubError(where, f"refused ({str(err).splitlines()[0][:200]})", f"check the repo id and revision, and {_FIX_ENDPOINT}", transient=False)
    if isinstance(err, OfflineModeIsEnabled):
        return HubError(where, "not asked: offline mode is on (HF_HUB_OFFLINE)", "unset HF_HUB_OFFLINE, or use local model folders", transient=False)
    if isinstance(err, LocalEntryNotFoundError):  # a HEAD answer without the Hub's headers (X-Repo-Commit, ETag), and no cached copy
        return HubError(where, f"lacks what a Hub sends ({str(err).split('. ')[0][:200]})", "check that HF_ENDPOINT is a Hub-compatible server",
                        transient=False)
    if isinstance(err, json.JSONDecodeError):
        return HubError(where, f"is not JSON ({err.msg}, character {err.pos})", "check that HF_ENDPOINT is a Hub-compatible server, not a proxy or web page",
                        transient=False)
    return err


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Run Hub calls about ``repo_id`` on the bounded client, with their failures as mergeflow errors (``hub_error``).

    Example:
        >>> with hub_errors("org/model", "main"):
        ...     info = HfApi().model_info("org/model", revision="main")
    """
    use_bounded_client()
    try:
        yield
    except Exception as err:
        mapped = hub_error(repo_id, revision, err)
        if mapped is err:
            raise
        raise mapped from (None if mapped is _own_error(err) else err)
