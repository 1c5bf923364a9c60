"""A small Hugging Face Hub-compatible HTTP server that keeps repos on local disk.

huggingface_hub talks to it unchanged: pass `endpoint=hub.endpoint` to `HfApi`, `snapshot_download` and
`hf_hub_download` (or set `HF_ENDPOINT` before huggingface_hub is imported). Tests and the offline demo use it.

It implements what `create_repo`, `upload_folder`/`upload_file`/`create_commit`, `model_info`/`repo_info`,
`list_repo_tree`, `get_paths_info`, `list_repo_refs`, `list_repo_commits`, `snapshot_download`,
`hf_hub_download`, `file_exists` and `get_safetensors_metadata` call in huggingface_hub 2.4. Every file is
stored as a regular git blob: preupload answers `uploadMode: "regular"`, so clients send content base64-encoded
in the commit and never use LFS or Xet (even with hf_xet installed). Only the `main` branch exists; revisions
are `main` or a full 40-hex commit id. Model and dataset repos are supported; repo ids need a namespace
(`namespace/name`), as there are no user accounts. Visibility is recorded, not enforced; an optional server token
guards every request. Run it in the foreground with `python -m mergeflow.local_hub ROOT --port N`.

Layout under `root`: `blobs/<sha256>` (content-addressed) and `repos/<type>s/<repo_id>/repo.json` (commits and
branches), so a server restarted on the same root serves the same repos.

Example:
    >>> with LocalHub(tmp_path / "hub") as hub:
    ...     HfApi(endpoint=hub.endpoint).create_repo("me/model")
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "main"]

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CHUNK = 1 << 20


class _HttpError(Exception):
    """An error answered as `status`; `code` is the X-Error-Code huggingface_hub maps to its exceptions."""

    def __init__(self, status: int, message: str, *, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _canonical_sha1(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME.fullmatch(p) and ".." not in p for p in parts):
        raise _HttpError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name' of letters, digits, '.-_'.")
    return repo_id


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo {path!r}.")
    return path


class _Store:
    """Repos (commit lists + branches) as JSON files and a content-addressed blob store, under one lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self._repos: dict[tuple[str, str], dict[str, Any]] = {}
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def _repo_file(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id / "repo.json"

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (repo_type, repo_id) in self._repos or self._repo_file(repo_type, repo_id).is_file()

    def repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        with self.lock:
            key = (repo_type, repo_id)
            if key not in self._repos:
                path = self._repo_file(repo_type, repo_id)
                if not path.is_file():
                    raise _HttpError(404, f"Repository not found: {repo_type} {repo_id!r}.", code="RepoNotFound")
                self._repos[key] = json.loads(path.read_text())
            return self._repos[key]

    def _save(self, repo: dict[str, Any]) -> None:
        path = self._repo_file(repo["type"], repo["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(repo, indent=1))
        os.replace(tmp, path)

    def create(self, repo_type: str, repo_id: str, *, private: bool) -> bool:
        """Create a repo with an empty initial commit; False if it already exists."""
        with self.lock:
            if self.exists(repo_type, repo_id):
                return False
            initial: dict[str, Any] = {"parent": None, "message": "initial commit", "description": "", "files": {}}
            sha = _canonical_sha1(initial)
            repo = {
                "id": repo_id,
                "type": repo_type,
                "private": private,
                "createdAt": _now(),
                "branches": {DEFAULT_BRANCH: sha},
                "commits": [{"sha": sha, "date": _now(), **initial}],
            }
            self._save(repo)
            self._repos[(repo_type, repo_id)] = repo
            return True

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            path = self._repo_file(repo_type, repo_id)
            self.repo(repo_type, repo_id)  # 404 if unknown
            path.unlink()
            path.parent.rmdir()
            self._repos.pop((repo_type, repo_id), None)

    def resolve(self, repo: dict[str, Any], revision: str) -> dict[str, Any]:
        """The commit a branch name or full commit id points to."""
        with self.lock:
            branch = revision.removeprefix("refs/heads/")
            sha = repo["branches"].get(branch, revision if _COMMIT_ID.fullmatch(revision) else None)
            for commit in reversed(repo["commits"]):
                if commit["sha"] == sha:
                    found: dict[str, Any] = commit
                    return found
        raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def put_blob(self, data: bytes) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha256
        if not path.is_file():
            tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return {"oid": _git_oid(data), "sha256": sha256, "size": len(data)}

    def blob_path(self, entry: dict[str, Any]) -> Path:
        return self.root / "blobs" / str(entry["sha256"])

    def commit(self, repo: dict[str, Any], branch: str, header: dict[str, Any], ops: list[dict[str, Any]]) -> str:
        """Apply `ops` on top of `branch`; returns the new head, or the old one when no file changed."""
        added = {}  # blobs are written before taking the lock
        for op in ops:
            if op["key"] == "file":
                value = op["value"]
                added[_check_path(value["path"])] = self.put_blob(base64.b64decode(value["content"]))
        with self.lock:
            if branch not in repo["branches"]:
                raise _HttpError(404, f"Invalid rev id: {branch} (commits go to a branch).", code="RevisionNotFound")
            head = self.resolve(repo, branch)
            parent = header.get("parentCommit")
            if parent is not None and parent != head["sha"]:
                raise _HttpError(412, f"parentCommit {parent} is not the head of {branch} ({head['sha']}).")
            files = dict(head["files"])
            for op in ops:
                key, path = op["key"], op["value"]["path"]
                if key == "file":
                    files[path] = added[path]
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    if not gone:
                        raise _HttpError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                    for p in gone:
                        del files[p]
                else:
                    raise _HttpError(400, f"Unsupported commit operation {key!r}: LocalHub stores regular files only.")
            if files == head["files"]:
                return str(head["sha"])
            content = {
                "parent": head["sha"],
                "message": header.get("summary", ""),
                "description": header.get("description", ""),
                "files": dict(sorted(files.items())),
            }
            sha = _canonical_sha1({**content, "files": {p: f["oid"] for p, f in content["files"].items()}})
            repo["commits"].append({"sha": sha, "date": _now(), **content})
            repo["branches"][branch] = sha
            self._save(repo)
            return sha


def _tree_entries(files: dict[str, dict[str, Any]], path: str, *, recursive: bool) -> list[dict[str, Any]]:
    """Tree listing of directory `path` ("" is the root) in the Hub's format."""
    prefix = f"{path}/" if path else ""
    below = {p: f for p, f in files.items() if p.startswith(prefix)}
    if path and not below:
        raise _HttpError(404, f"Directory not found: {path}", code="EntryNotFound")
    entries: dict[str, dict[str, Any]] = {}
    for p, f in sorted(below.items()):
        parts = p[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            folder = prefix + "/".join(parts[:i])
            tree = {q: g["oid"] for q, g in files.items() if q.startswith(folder + "/")}
            entries.setdefault(folder, {"type": "directory", "oid": _canonical_sha1(tree), "size": 0, "path": folder})
        if recursive or len(parts) == 1:
            entries[p] = {"type": "file", "oid": f["oid"], "size": f["size"], "path": p}
    return list(entries.values())


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) for a single-range `Range` header; None serves the whole file."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise _HttpError(416, f"Range {header!r} is not satisfiable for {size} bytes.")
    return start, end


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.info("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ----------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        try:
            self.body = self._read_body()
            self._check_auth()
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            segments = [unquote(s) for s in url.path.split("/")[1:]]
            self._route(method, segments)
        except _HttpError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._send_json(error.status, {"error": error.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away during %s %s", method, self.path)
        except Exception as error:  # a bug here must not kill the server thread
            logger.exception("LocalHub failed on %s %s", method, self.path)
            self._send_json(500, {"error": f"LocalHub internal error: {error!r}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _check_auth(self) -> None:
        expected = self.server.token
        if expected is None:
            return
        given = self.headers.get("Authorization", "")
        if not given:
            raise _HttpError(401, "Authentication required: pass the LocalHub token.")
        if given != f"Bearer {expected}":
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        base = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self._send(status, body, {**base, **(headers or {})})

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise _HttpError(400, f"Request body is not JSON: {error}") from error

    @property
    def store(self) -> _Store:
        return self.server.store

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    # -- routes ------------------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str]) -> None:
        if seg[:1] == ["api"]:
            route = (method, "/".join(seg[1:3]))
            if route == ("POST", "repos/create"):
                return self._create_repo()
            if route == ("DELETE", "repos/delete"):
                return self._delete_repo()
            if route == ("POST", "validate-yaml"):
                return self._send_json(200, {"errors": [], "warnings": []})
            if len(seg) >= 4 and seg[1] in ("models", "datasets"):
                return self._repo_api(method, seg[1][:-1], _check_repo_id("/".join(seg[2:4])), seg[4:])
        elif method in ("GET", "HEAD"):
            repo_type = "dataset" if seg[0] == "datasets" else "model"
            rest = seg[1:] if repo_type == "dataset" else seg
            if len(rest) >= 5 and rest[2] == "resolve":
                return self._resolve(repo_type, _check_repo_id("/".join(rest[:2])), rest[3], "/".join(rest[4:]))
        raise _HttpError(501, f"LocalHub does not implement {method} {urlsplit(self.path).path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        repo = self.store.repo(repo_type, repo_id)
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        if method == "GET" and action in ("", "revision"):
            return self._send_json(200, self._info(repo, args[0] if args else DEFAULT_BRANCH))
        if method == "GET" and action == "tree" and args:
            files = self.store.resolve(repo, args[0])["files"]
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._send_json(200, _tree_entries(files, "/".join(args[1:]), recursive=recursive))
        if method == "POST" and action == "paths-info" and args:
            return self._paths_info(repo, args[0])
        if method == "POST" and action == "preupload" and args:
            return self._preupload(repo, args[0])
        if method == "POST" and action == "commit" and args:
            return self._commit(repo, args[0])
        if method == "GET" and action == "commits" and args:
            return self._commits(repo, args[0])
        if method == "GET" and action == "refs":
            refs = repo["branches"].items()
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in refs]
            return self._send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        raise _HttpError(501, f"LocalHub does not implement {method} {urlsplit(self.path).path}")

    def _create_repo(self) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise _HttpError(400, f"LocalHub supports repo types {REPO_TYPES}, not {repo_type!r}.")
        repo_id = _check_repo_id("/".join(p for p in (body.get("organization"), body.get("name")) if p))
        created = self.store.create(repo_type, repo_id, private=body.get("visibility") == "private")
        url = self._repo_url(repo_type, repo_id)
        if not created:
            return self._send_json(409, {"error": f"You already created this {repo_type} repo", "url": url})
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        body = self._json_body()
        repo_id = _check_repo_id("/".join(p for p in (body.get("organization"), body.get("name")) if p))
        self.store.delete(body.get("type") or "model", repo_id)
        self._send_json(200, {})

    def _info(self, repo: dict[str, Any], revision: str) -> dict[str, Any]:
        commit = self.store.resolve(repo, revision)
        siblings = [{"rfilename": p, "size": f["size"], "blobId": f["oid"]} for p, f in commit["files"].items()]
        return {
            "id": repo["id"],
            "author": repo["id"].split("/")[0],
            "sha": commit["sha"],
            "lastModified": commit["date"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def _paths_info(self, repo: dict[str, Any], revision: str) -> None:
        files = self.store.resolve(repo, revision)["files"]
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self._json_body().get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        entries = _tree_entries(files, "", recursive=True)
        wanted = {p.strip("/") for p in paths}
        self._send_json(200, [e for e in entries if e["path"] in wanted])

    def _preupload(self, repo: dict[str, Any], revision: str) -> None:
        # "regular" for every file: the client then sends content base64 in the commit, never LFS/Xet. "oid" is
        # the git oid of the file already at `revision`; the client drops files whose local git oid matches it.
        files = self.store.resolve(repo, revision)["files"]
        answer = [
            {"path": p, "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(p, {}).get("oid")}
            for p in (f["path"] for f in self._json_body().get("files", []))
        ]
        self._send_json(200, {"files": answer})

    def _commit(self, repo: dict[str, Any], revision: str) -> None:
        if self.query.get("create_pr", ["0"])[0] not in ("0", ""):
            raise _HttpError(400, "LocalHub does not support pull requests (create_pr).")
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise _HttpError(400, f"Commit body is not NDJSON: {error}") from error
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "Commit body must start with a 'header' line.")
        try:
            sha = self.store.commit(repo, revision, lines[0]["value"], lines[1:])
        except (KeyError, TypeError, ValueError) as error:  # malformed lines; ValueError covers bad base64
            raise _HttpError(400, f"Malformed commit operation: {error!r}") from error
        url = f"{self._repo_url(repo['type'], repo['id'])}/commit/{sha}"
        self._send_json(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _commits(self, repo: dict[str, Any], revision: str) -> None:
        by_sha = {c["sha"]: c for c in repo["commits"]}
        commit: dict[str, Any] | None = self.store.resolve(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit["sha"],
                    "title": commit["message"],
                    "message": commit["description"],
                    "date": commit["date"],
                    "authors": [{"user": "local"}],
                }
            )
            commit = by_sha.get(commit["parent"]) if commit["parent"] else None
        self._send_json(200, history)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self.store.repo(repo_type, repo_id)
        commit = self.store.resolve(repo, revision)
        entry = commit["files"].get(path)
        if entry is None:
            raise _HttpError(404, f"Entry not found: {path}", code="EntryNotFound", commit=commit["sha"])
        size = entry["size"]
        headers = {
            "X-Repo-Commit": commit["sha"],
            "ETag": f'"{entry["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        try:
            span = _byte_range(self.headers.get("Range"), size)
        except _HttpError as error:
            headers["Content-Range"] = f"bytes */{size}"
            self._send(416, b"", {**headers, "Content-Length": "0", "X-Error-Message": error.message})
            return
        start, end = span if span is not None else (0, size - 1)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(206 if span is not None else 200)
        for name, value in {**headers, "Content-Length": str(end - start + 1)}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(self.store.blob_path(entry), "rb") as blob:
            blob.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = blob.read(min(_CHUNK, remaining))
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, store: _Store, token: str | None) -> None:
        super().__init__(address, _Handler)
        self.store, self.token = store, token
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        self.endpoint = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


class LocalHub:
    """A Hub-compatible server for repos stored under `root`, run in a daemon thread.

    Args:
        root: Directory holding blobs and repos; created if missing, reused across restarts.
        host: Interface to bind.
        port: Port to bind; 0 picks a free one (read it back from `endpoint`).
        token: When set, requests must send `Authorization: Bearer <token>`; others get 401.

    Example:
        >>> with LocalHub(Path("/tmp/hub")) as hub:
        ...     api = HfApi(endpoint=hub.endpoint)
    """

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.root, self.host, self.port, self.token = Path(root), host, port, token
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The server's base URL, e.g. `http://127.0.0.1:41234`.

        Raises:
            RuntimeError: If the server is not started.
        """
        if self._server is None:
            raise RuntimeError("LocalHub is not started: call start() or use it in a `with` block.")
        return self._server.endpoint

    def start(self) -> LocalHub:
        """Bind the port and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), store=_Store(self.root), token=self.token)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; requests in flight finish in their own threads."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server, self._thread = None, None

    def wait(self) -> None:
        """Block until the server stops (or Ctrl-C)."""
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a LocalHub in the foreground: `python -m mergeflow.local_hub ROOT --port N`."""
    parser = argparse.ArgumentParser(prog="python -m mergeflow.local_hub", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory holding the repos (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="require this Bearer token on every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hub = LocalHub(args.root, host=args.host, port=args.port, token=args.token).start()
    print(f"LocalHub serving {args.root} at {hub.endpoint}\nexport HF_ENDPOINT={hub.endpoint}", flush=True)
    try:
        hub.wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
