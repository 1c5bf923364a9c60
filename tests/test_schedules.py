"""Schedules against a real `prefect server start` (SQLite, 127.0.0.1): `mergeflow serve --cron` and prefect.yaml."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import write_recipe
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import Deployment
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CRON = "0 3 * * *"
pytestmark = pytest.mark.slow  # a real `prefect server start` and `mergeflow serve` subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):  # noqa: ANN001, ANN201 (a test helper)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen in {timeout} s")


def stop(process: subprocess.Popen) -> None:
    """SIGINT, then SIGKILL, to the process group of a process this test started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on a free port with its own PREFECT_HOME (SQLite)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log = open(home / "server.log", "wb")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 120, "the Prefect server start")
        yield url
    finally:
        stop(server)
        log.close()


def read_deployment(url: str, name: str) -> Deployment:
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_serve_on_cron_and_run_once(prefect_server: str, family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "nightly.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(family["base"]),
        "models": [{"model": str(family[n]), "parameters": {"weight": 0.5}} for n in ("ft_a", "ft_b")],
    })
    out = tmp_path / "nightly-out"
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([str(BIN / "mergeflow"), "serve", str(recipe), "--cron", CRON, "--out", str(out), "--shard-size", "20KB"],
                             cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deployment = wait_for(lambda: read_deployment(prefect_server, "merge_pipeline/merge-nightly"), 90, "the deployment")
        (schedule,) = deployment.schedules
        assert schedule.active and schedule.schedule.cron == CRON and schedule.schedule.timezone == "UTC"
        assert deployment.parameters["out"] == str(out) and deployment.parameters["force"] is True

        with temporary_settings({PREFECT_API_URL: prefect_server}):
            run = run_deployment("merge_pipeline/merge-nightly", timeout=180, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
        assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    finally:
        stop(serve)
        log.close()


def test_prefect_yaml_deploys_with_its_schedule(prefect_server: str, tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (entry,) = spec["deployments"]
    env = dict(os.environ, PREFECT_API_URL=prefect_server)
    prefect = [str(BIN / "prefect"), "--no-prompt"]
    subprocess.run([*prefect, "work-pool", "create", entry["work_pool"]["name"], "--type", "process"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([*prefect, "deploy", "--all"], cwd=ROOT, env=env, check=True, capture_output=True)
    deployment = read_deployment(prefect_server, f"merge_pipeline/{entry['name']}")
    assert [s.schedule.cron for s in deployment.schedules] == [entry["schedules"][0]["cron"]]
    assert deployment.parameters == entry["parameters"] and deployment.entrypoint == entry["entrypoint"]
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
