"""MLflow store fixtures for the tracking and flow tests; use as a plugin: ``pytest_plugins = ["evaluate_publish_fixtures"]``.

A fresh MLflow SQLite store costs ~2-3 s of migrations: ``mlflow_template`` makes one per session and
``mlflow_store`` copies it into each test's ``mlruns/`` (the local store layout: database and artifacts in
one folder).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mergeflow import settings


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite database."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local store in ``tmp_path/mlruns`` (settings point at it, MLFLOW_TRACKING_URI unset); returns its URI."""
    root = tmp_path / "mlruns"
    root.mkdir()
    shutil.copyfile(mlflow_template, root / "mlflow.db")
    monkeypatch.setattr(settings, "MLRUNS_DIR", root)
    monkeypatch.setattr(settings, "MLFLOW_TRACKING_URI", None)
    return f"sqlite:///{root / 'mlflow.db'}"

