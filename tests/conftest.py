"""Shared test setup: one torch thread (2-core machine), offline Hugging Face, tiny model families."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from tiny_family import build_family  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float32 tiny Llama family (base, ft_a, ft_b, ft_neg), each a single safetensors file."""
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture
def models(family: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Copies of the family's base, ft_a and ft_b for tests that may break them (the shared family stays intact whatever they do)."""
    return {k: Path(shutil.copytree(family[k], tmp_path / "models" / k)) for k in ("base", "ft_a", "ft_b")}


@pytest.fixture
def wide_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's error console 1000 columns wide: one error line stays one line in the captured output."""
    from mergeflow.cli import console_errors

    monkeypatch.setattr(console_errors.console, "width", 1000)


@pytest.fixture(scope="session")
def sharded_bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same family stored as bfloat16 in three shards with an index."""
    return build_family(tmp_path_factory.mktemp("family_bf16"), dtype=torch.bfloat16, shards=3)


# -- Prefect: a temporary home, no analytics, and one temporary API for the whole session ----------
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mergeflow-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)  # never a developer's server


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """prefect_test_harness entered once (~12 s); its URL is exported for subprocesses and Dask workers."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


# -- test tiers: the fast tier (-m "not slow") never starts a slow fixture ---------------------------
SLOW_FIXTURES = {"prefect_api", "prefect_server", "dask_cluster", "demo_family", "demo_family_rebuild", "mlflow_template"}
"""Prefect harness and server, Dask cluster, demo family build (minutes), MLflow store migrations."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses a slow fixture (directly or through another fixture) must be marked slow."""
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(SLOW_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError("mark these tests @pytest.mark.slow, they use a slow fixture:\n  " + "\n  ".join(unmarked))
