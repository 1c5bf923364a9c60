"""Resolving and downloading sources against a LocalHub on 127.0.0.1: pinned commits, allow-list, token, errors."""
from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from pipeline_helpers import hub_online, push
from prefect import flow
from prefect.client.orchestration import get_client

from merge_ops.errors import ModelNotFoundError
from merge_ops.recipe import ModelRef
from mergeflow import settings
from mergeflow.errors import HubAccessError
from mergeflow.local_hub import LocalHub
from mergeflow.sources import Source, download_source, resolve_source
from tasks.sources import download_model, resolve_model

REPO = "mergeflow/ft-a"


@pytest.fixture
def model_with_extras(family: dict[str, Path], tmp_path: Path) -> Path:
    """ft_a plus files that must not be downloaded by default."""
    folder = tmp_path / "upload"
    shutil.copytree(family["ft_a"], folder)
    for name in ("pytorch_model.bin", "model.gguf", "weights.pt", "weights.pth", "model.ckpt"):
        (folder / name).write_bytes(b"pickle")
    (folder / "tokenizer.model").write_bytes(b"spm")
    (folder / "README.md").write_text("---\nbase_model: mergeflow/base\n---\n")
    return folder


def ref(text: str) -> ModelRef:
    return ModelRef.model_validate(text)


def test_download_pins_the_commit_and_skips_pickles(model_with_extras: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        first = push(api, REPO, model_with_extras, "v1")
        old_config = (model_with_extras / "config.json").read_bytes()
        (model_with_extras / "config.json").write_text('{"model_type": "llama", "changed": true}')
        second = push(api, REPO, model_with_extras, "v2")

        pinned = resolve_source(ref(f"{REPO}@{first}"), base_dir=tmp_path, endpoint=hub.endpoint)
        latest = resolve_source(ref(REPO), base_dir=tmp_path, endpoint=hub.endpoint)
        assert (pinned.commit_sha, pinned.revision, latest.commit_sha, latest.revision) == (first, first, second, None)
        assert pinned.path is None  # nothing downloaded yet

        local = download_source(pinned, endpoint=hub.endpoint)
        assert local.path is not None and local.path.name == first
        assert (local.path / "config.json").read_bytes() == old_config
        assert sorted(p.name for p in local.path.iterdir()) == [
            "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
        ]
        with_bin = download_source(latest, endpoint=hub.endpoint, cache_dir=tmp_path / "other", extra_patterns=["*.bin"])
        assert (with_bin.path / "pytorch_model.bin").is_file() and not (with_bin.path / "model.gguf").exists()


def test_local_folders_pass_through(family: dict[str, Path], tmp_path: Path) -> None:
    source = resolve_source(ref("ft_a"), base_dir=family["base"].parent)
    assert source == Source(key="ft_a", path=family["ft_a"].resolve())
    assert download_source(source) == source
    with pytest.raises(ModelNotFoundError, match="not a local folder"):
        resolve_source(ref("no/such/folder"), base_dir=tmp_path)


def test_token_comes_from_the_environment(model_with_extras: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub", token="s3cret-token") as hub:
        push(HfApi(endpoint=hub.endpoint, token="s3cret-token"), REPO, model_with_extras)
        with pytest.raises(HubAccessError, match="401.*hf auth login"):
            resolve_source(ref(REPO), base_dir=tmp_path, endpoint=hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "s3cret-token")
        source = download_source(resolve_source(ref(REPO), base_dir=tmp_path, endpoint=hub.endpoint), endpoint=hub.endpoint)
        assert (source.path / "model.safetensors").is_file()


@pytest.mark.slow
def test_tasks_never_log_the_token_and_do_not_retry_permanent_errors(
    prefect_api: str, model_with_extras: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub_online(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "s3cret-token")

    @flow
    def fetch(endpoint: str) -> tuple[Source, str]:
        source = download_model(resolve_model(ref(REPO), tmp_path, endpoint), endpoint)
        missing = resolve_model.submit(ref("nobody/nothing"), tmp_path / "recipe.yaml", endpoint)
        missing.wait()
        return source, str(missing.task_run_id)

    caplog.set_level(logging.DEBUG)
    with LocalHub(tmp_path / "hub", token="s3cret-token") as hub:
        push(HfApi(endpoint=hub.endpoint, token="s3cret-token"), REPO, model_with_extras)
        source, missing_id = fetch(hub.endpoint)
    assert (source.path / "model.safetensors").is_file()
    with get_client(sync_client=True) as client:
        missing = client.read_task_run(missing_id)
        logs = client.read_logs()
    assert missing.state.is_failed() and missing.run_count == 1, "a 404 must not be retried"
    recorded = " ".join(log.message for log in logs) + caplog.text
    assert "s3cret-token" not in recorded
    assert "nobody/nothing" in recorded


def test_settings_read_the_pipeline_environment(
    model_with_extras: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        sha = push(HfApi(endpoint=hub.endpoint), REPO, model_with_extras)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
        monkeypatch.setenv("MERGEFLOW_HF_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("MERGEFLOW_WORKERS", "7")
        monkeypatch.setenv("MERGEFLOW_DASK_ADDRESS", "tcp://127.0.0.1:8786")
        try:
            reloaded = importlib.reload(settings)
            assert (reloaded.HF_ENDPOINT, reloaded.HF_CACHE_DIR, reloaded.WORKERS, reloaded.DASK_ADDRESS) == (
                hub.endpoint, tmp_path / "cache", 7, "tcp://127.0.0.1:8786",
            )
            source = download_source(resolve_source(ref(REPO), base_dir=tmp_path))  # no endpoint, no cache_dir given
            assert source.commit_sha == sha and source.path.is_relative_to(tmp_path / "cache")
        finally:
            monkeypatch.undo()
            importlib.reload(settings)
