"""The main job's flow end to end: family -> local Hub -> download -> check -> merge -> evaluate -> gate -> publish."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from flows.demo import MERGED_REPO, demo
from merge_ops import settings
from mergeflow.local_hub import LocalHub
from pipeline_helpers import hub_online

pytest_plugins = ["demo_family_fixtures", "evaluate_publish_fixtures"]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_demo_runs_the_whole_pipeline_from_hub_ids(
    prefect_api: str, mlflow_store: str, demo_family, demo_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_online(tmp_path, monkeypatch)
    monkeypatch.setattr(settings, "EVAL_CACHE_DIR", tmp_path / "eval-cache")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "demo-family").symlink_to(demo_family.root)  # the session's family: a cache hit
    with LocalHub(tmp_path / "hub") as hub:
        result = demo(workdir=workdir, endpoint=hub.endpoint)
        published = snapshot_download(MERGED_REPO, cache_dir=tmp_path / "check", endpoint=hub.endpoint)

    # the sources came from the Hub, pinned to commits
    assert {s.repo_id for s in result.merge.sources} == {"demo/base", "demo/add", "demo/reverse"}
    assert all(s.commit_sha and len(s.commit_sha) == 40 for s in result.merge.sources)
    # the merge combines the skills: its two-task mean beats every source's
    evaluation = result.evaluation
    merged = evaluation.merged.scores
    mean = (merged["skill_add"] + merged["skill_reverse"]) / 2
    best_source = max((r.scores["skill_add"] + r.scores["skill_reverse"]) / 2 for r in evaluation.sources.values())
    assert mean > best_source
    # gate passed, published byte for byte
    assert evaluation.gate.passed and evaluation.outcome == "published"
    assert evaluation.published is not None and evaluation.published.commit_sha
    assert digests(Path(published)) == digests(result.merge.out)
