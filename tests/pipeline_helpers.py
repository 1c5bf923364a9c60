"""Helpers for the pipeline tests: Hub setup against LocalHub, recipes, folder comparison."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, constants

from mergeflow import settings


def hub_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-test HF home and cache, no token, online (conftest sets HF_HUB_OFFLINE=1 for the rest)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(settings, "HF_CACHE_DIR", home / "hub")
    return home


def push(api: HfApi, repo_id: str, folder: Path, message: str = "upload") -> str:
    """Upload ``folder`` as ``repo_id``; returns the commit sha."""
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message).oid


def write_recipe(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ties_recipe(base: str, a: str, b: str) -> dict:
    two = [{"model": m, "parameters": {"weight": 0.6, "density": 0.5}} for m in (a, b)]
    return {"merge_method": "ties", "base_model": base, "models": two, "dtype": "bfloat16"}


def folder_bytes(folder: Path, *, suffix: str = "") -> dict[str, bytes]:
    """Every file (or those ending with ``suffix``) of a folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name.endswith(suffix)}
