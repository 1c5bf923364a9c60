"""Hub faults: a silent, failing or garbling endpoint on 127.0.0.1 is one clear error within MERGEFLOW_HUB_TIMEOUT, with
no retry inside huggingface_hub and nothing written; invalid repo ids fail before any request; 401/404 are not retried."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi
from pipeline_helpers import hub_online, push

from merge_ops.errors import CorruptModelError, MergeflowError, ModelNotFoundError, RecipeError
from merge_ops.recipe import ModelRef
from merge_ops.recipe_file import load_recipe
from mergeflow import settings
from mergeflow.errors import HubAccessError, HubError, PublishError
from mergeflow.hub import publish_model
from mergeflow.local_hub import LocalHub
from mergeflow.sources import Source, download_source, read_source_headers, resolve_source
from tasks.retries import only_transient, retry_delays

TIMEOUT = 1.0
SHA = "0123456789abcdef0123456789abcdef01234567"


class SilentHub:
    """Accepts every connection and never answers."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.endpoint = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.socket.close()
        for conn in self.held:
            conn.close()


class FaultyHub(ThreadingHTTPServer):
    """Answers every request with ``answer(handler)``; counts the requests."""

    daemon_threads = True

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.answer, self.requests = answer, 0

        class Handler(BaseHTTPRequestHandler):
            def handle_one_request(self) -> None:
                self.close_connection = True
                super().handle_one_request()

            def __getattr__(self, name: str) -> Any:
                if not name.startswith("do_"):
                    raise AttributeError(name)
                return self.answer_request

            def answer_request(self) -> None:
                self.server.requests += 1  # type: ignore[attr-defined]
                self.server.answer(self)  # type: ignore[attr-defined]

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def status(code: int, body: bytes = b'{"error": "boom"}') -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def cut_off(announced: int, body: bytes, stall: float = 0.0) -> Callable[[BaseHTTPRequestHandler], None]:
    """200 announcing ``announced`` bytes, sending ``body``, then (after ``stall`` s) closing the connection."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(announced))
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
        time.sleep(stall)

    return answer


@pytest.fixture(autouse=True)
def short_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    monkeypatch.setattr(settings, "HUB_TIMEOUT", TIMEOUT)


@pytest.fixture
def silent() -> Iterator[SilentHub]:
    hub = SilentHub()
    yield hub
    hub.close()


@pytest.fixture
def faulty() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler], None]], FaultyHub]]:
    servers: list[FaultyHub] = []

    def start(answer: Callable[[BaseHTTPRequestHandler], None]) -> FaultyHub:
        servers.append(FaultyHub(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def hub_source(repo_id: str = "org/model") -> Source:
    return Source(key=repo_id, repo_id=repo_id, commit_sha=SHA)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def failure(call: Callable[[], object], error: type[MergeflowError], *, within: float = TIMEOUT + 2.0) -> MergeflowError:
    """The error ``call`` raises, checked to come as one line within ``within`` seconds."""
    started = time.perf_counter()
    with pytest.raises(error) as raised:
        call()
    assert time.perf_counter() - started < within
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400
    return raised.value


@pytest.fixture
def merged_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return folder


# -- an endpoint that accepts the connection and never answers ----------------------------------------------------


def test_silent_hub_fails_resolve_within_the_timeout(silent: SilentHub, tmp_path: Path) -> None:
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=silent.endpoint), HubError)
    assert isinstance(err, HubError) and err.transient
    assert f"Hub request GET {silent.endpoint}/api/models/org/model: no answer within 1 s" in str(err)
    assert "MERGEFLOW_HUB_TIMEOUT" in str(err)


def test_silent_hub_fails_header_reads_without_the_clients_own_retries(silent: SilentHub, tmp_path: Path) -> None:
    err = failure(lambda: read_source_headers(hub_source(), endpoint=silent.endpoint, cache_dir=tmp_path / "cache"), HubError)
    assert "HEAD" in str(err) and "config.json" in str(err) and "no answer within 1 s" in str(err)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_silent_hub_fails_download_and_writes_no_model(silent: SilentHub, tmp_path: Path) -> None:
    err = failure(lambda: download_source(hub_source(), endpoint=silent.endpoint, cache_dir=tmp_path / "cache"), HubError)
    assert "no answer within 1 s" in str(err)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_silent_hub_fails_publish_and_leaves_the_folder(silent: SilentHub, merged_folder: Path) -> None:
    before = files_under(merged_folder)
    err = failure(lambda: publish_model(merged_folder, repo_id="me/merged", endpoint=silent.endpoint), HubError)
    assert "POST" in str(err) and "/api/repos/create" in str(err) and "no answer within 1 s" in str(err)
    assert files_under(merged_folder) == before


def test_answer_that_stalls_midway_times_out(faulty: Callable[..., FaultyHub], tmp_path: Path) -> None:
    hub = faulty(cut_off(200, b'{"id": "org/model", ', stall=TIMEOUT * 3))
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=hub.endpoint), HubError)
    assert isinstance(err, HubError) and err.transient and "no answer within 1 s" in str(err)


def test_refused_connection_is_transient(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=endpoint), HubError, within=1.0)
    assert isinstance(err, HubError) and err.transient and "cannot connect" in str(err)


# -- an endpoint that fails or garbles its answers -------------------------------------------------------------------


@pytest.mark.parametrize(("code", "phrase"), [(500, "500 Internal Server Error"), (503, "503 Service Unavailable"), (429, "429 Too Many Requests")])
def test_server_errors_are_transient_and_tried_once(faulty: Callable[..., FaultyHub], tmp_path: Path, code: int, phrase: str) -> None:
    hub = faulty(status(code))
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=hub.endpoint), HubError, within=1.0)
    assert isinstance(err, HubError) and err.transient and f"the server answered {phrase}" in str(err)
    assert hub.requests == 1, "huggingface_hub must not retry on its own"


def test_server_error_on_header_reads_and_publish(faulty: Callable[..., FaultyHub], merged_folder: Path, tmp_path: Path) -> None:
    hub = faulty(status(500))
    before = files_under(merged_folder)
    for call in (lambda: read_source_headers(hub_source(), endpoint=hub.endpoint, cache_dir=tmp_path / "cache"),
                 lambda: download_source(hub_source(), endpoint=hub.endpoint, cache_dir=tmp_path / "cache"),
                 lambda: publish_model(merged_folder, repo_id="me/merged", endpoint=hub.endpoint)):
        assert "500 Internal Server Error" in str(failure(call, HubError, within=1.0))
    assert hub.requests == 3 and files_under(merged_folder) == before
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.parametrize("body", [b"<html><body>proxy says hello</body></html>", b'{"id": "org/model", "sha'])
def test_answer_that_is_not_json_is_a_permanent_error(faulty: Callable[..., FaultyHub], tmp_path: Path, body: bytes) -> None:
    hub = faulty(status(200, body))
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=hub.endpoint), HubError, within=1.0)
    assert isinstance(err, HubError) and not err.transient
    assert "the Hub's answer about org/model: is not JSON" in str(err) and "HF_ENDPOINT is a Hub-compatible server" in str(err)


def test_answer_cut_off_is_transient(faulty: Callable[..., FaultyHub], tmp_path: Path) -> None:
    hub = faulty(cut_off(500, b'{"id": "org/model", "sha": "01'))
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=hub.endpoint), HubError, within=1.0)
    assert isinstance(err, HubError) and err.transient and "broke off mid-answer" in str(err)


def test_json_answer_without_a_commit_is_refused(faulty: Callable[..., FaultyHub], tmp_path: Path) -> None:
    hub = faulty(status(200, b'{"id": "org/model", "siblings": []}'))
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=hub.endpoint), HubError, within=1.0)
    assert isinstance(err, HubError) and not err.transient and "names no commit (sha)" in str(err)


def test_unreadable_safetensors_header_on_the_hub(tmp_path: Path, merged_folder: Path) -> None:
    (merged_folder / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"not a JSON head!")
    with LocalHub(tmp_path / "hub") as hub:
        sha = push(HfApi(endpoint=hub.endpoint), "org/model", merged_folder)
        source = Source(key="org/model", repo_id="org/model", commit_sha=sha)
        err = failure(lambda: read_source_headers(source, endpoint=hub.endpoint, cache_dir=tmp_path / "cache"), CorruptModelError, within=2.0)
    assert str(err) == f"org/model@{sha}: the Hub's safetensors header is unreadable (header is not json-encoded string); check the repo's weights, and HF_ENDPOINT"


def test_web_server_that_is_no_hub_is_named(faulty: Callable[..., FaultyHub], tmp_path: Path) -> None:
    hub = faulty(status(200, b"{}"))
    err = failure(lambda: read_source_headers(hub_source(), endpoint=hub.endpoint, cache_dir=tmp_path / "cache"), HubError, within=1.0)
    assert isinstance(err, HubError) and not err.transient
    assert str(err).startswith(f"the Hub's answer about org/model@{SHA}: lacks what a Hub sends (") and "HF_ENDPOINT is a Hub-compatible server" in str(err)


def test_offline_mode_is_a_permanent_error(silent: SilentHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=silent.endpoint), HubError, within=0.5)
    assert isinstance(err, HubError) and not err.transient and "offline mode is on (HF_HUB_OFFLINE)" in str(err)
    assert silent.held == []


def test_missing_files_are_named_not_mapped(tmp_path: Path, merged_folder: Path) -> None:
    bare, adapter = tmp_path / "bare", tmp_path / "adapter"
    bare.mkdir()
    adapter.mkdir()
    (bare / "model.safetensors").write_bytes((merged_folder / "model.safetensors").read_bytes())
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}')
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        pinned = {name: Source(key=f"org/{name}", repo_id=f"org/{name}", commit_sha=push(api, f"org/{name}", folder))
                  for name, folder in (("model", merged_folder), ("bare", bare), ("lora", adapter))}
        err = failure(lambda: read_source_headers(pinned["bare"], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"), ModelNotFoundError, within=2.0)
        assert "the repo has no config.json" in str(err)
        adapted = pinned["model"].model_copy(update={"adapter": pinned["lora"]})
        err = failure(lambda: read_source_headers(adapted, endpoint=hub.endpoint, cache_dir=tmp_path / "cache"), ModelNotFoundError, within=2.0)
        assert "the repo has no adapter_model.safetensors" in str(err)


# -- invalid ids, refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["a/b/c", "../x", "org/na me", "org/x..y", "/x", "org/"])
def test_invalid_repo_ids_fail_before_any_request(faulty: Callable[..., FaultyHub], tmp_path: Path, merged_folder: Path, repo_id: str) -> None:
    hub = faulty(status(500))
    err = failure(lambda: resolve_source(ModelRef(path=repo_id), base_dir=tmp_path, endpoint=hub.endpoint), ModelNotFoundError, within=0.5)
    assert "nor a Hub repo id of the form org/name" in str(err)
    err = failure(lambda: publish_model(merged_folder, repo_id=repo_id, endpoint=hub.endpoint), PublishError, within=0.5)
    assert f"cannot publish to {repo_id!r}" in str(err)
    assert hub.requests == 0


def test_empty_model_reference_is_a_recipe_error(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('merge_method: linear\nmodels:\n  - model: ""\n  - model: "@main"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert err.value.problems == [f"models[{i}].model.path: '' -> an empty model reference; write a local model folder or a Hub repo id org/name"
                                  for i in (0, 1)]


def test_refused_token_and_missing_repo_or_revision(tmp_path: Path, merged_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalHub(tmp_path / "hub", token="right-token") as hub:
        push(HfApi(endpoint=hub.endpoint, token="right-token"), "org/model", merged_folder)
        monkeypatch.setenv("HF_TOKEN", "wrong-s3cret")
        err = failure(lambda: resolve_source(ModelRef(path="org/model"), base_dir=tmp_path, endpoint=hub.endpoint), HubAccessError, within=1.0)
        assert "(401)" in str(err) and "wrong-s3cret" not in str(err) and "right-token" not in str(err)
        err = failure(lambda: publish_model(merged_folder, repo_id="org/other", endpoint=hub.endpoint), PublishError, within=1.0)
        assert "(401)" in str(err) and "wrong-s3cret" not in str(err)
        monkeypatch.setenv("HF_TOKEN", "right-token")
        err = failure(lambda: resolve_source(ModelRef(path="org/absent"), base_dir=tmp_path, endpoint=hub.endpoint), ModelNotFoundError, within=1.0)
        assert "the Hub has no such repo" in str(err)
        err = failure(lambda: resolve_source(ModelRef(path="org/model", revision="v9"), base_dir=tmp_path, endpoint=hub.endpoint),
                      ModelNotFoundError, within=1.0)
        assert "'org/model@v9': the Hub has no such revision" in str(err)


# -- what the network tasks retry ----------------------------------------------------------------------------------


class _Failed:
    def __init__(self, err: Exception) -> None:
        self.err = err

    def result(self) -> None:
        raise self.err


@pytest.mark.parametrize(("err", "retried"), [
    (HubError("x", "no answer within 1 s", "wait", transient=True), True),
    (HubError("x", "is not JSON", "check HF_ENDPOINT", transient=False), False),
    (HubAccessError("org/model", 401), False),
    (ModelNotFoundError("org/model", "no such repo"), False),
    (ConnectionResetError("MLflow went away"), True),
])
def test_only_transient_failures_are_retried(err: Exception, retried: bool) -> None:
    assert only_transient(None, None, _Failed(err)) is retried  # type: ignore[arg-type]


def test_retry_delays_are_bounded_and_configurable() -> None:
    assert retry_delays(3, 2) == [2, 8, 30]
    assert retry_delays(2, 0.1) == pytest.approx([0.1, 0.4])
    assert retry_delays(0, 2) == []


# -- from the command line, through the Prefect tasks and their retries -----------------------------------------------


@pytest.mark.slow
def test_check_against_a_silent_hub_is_one_line_after_bounded_retries(
    prefect_api: str, silent: SilentHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import flows.check  # noqa: F401  (Prefect sets up its log handlers on import: with the real stderr, not CliRunner's)
    from mergeflow.cli import app
    from tasks.sources import resolve_model

    monkeypatch.setattr(resolve_model, "retries", 1)
    monkeypatch.setattr(resolve_model, "retry_delay_seconds", [0.1])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/model\n    parameters: {weight: 1.0}\n")
    before = files_under(tmp_path)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["check", str(recipe), "--endpoint", silent.endpoint])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 1, result.output
    assert f"error: Hub request GET {silent.endpoint}/api/models/org/model: no answer within 1 s" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert len(silent.held) == 2, "one try and one retry"
    assert elapsed < 20
    assert files_under(tmp_path) == before
