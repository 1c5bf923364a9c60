"""The DVC metrics and the demo's scores table carry lm-eval's standard errors (± se)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from evaluate_publish_helpers import fake_eval
from rich.console import Console

from mergeflow import settings
from mergeflow.cli.demo_report import print_demo_report
from mergeflow.cli.stage import METRICS, OUTCOME
from mergeflow.stage_records import write_scores


def test_metrics_and_the_scores_table_show_standard_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    merged = fake_eval(tmp_path, {"skill_add": 0.6, "skill_reverse": 0.85}, tmp_path / "raw", name="merged")
    sources = {"demo/add": fake_eval(tmp_path, {"skill_add": 0.8, "skill_reverse": 0.0}, tmp_path / "raw", name="add")}
    metrics = write_scores(merged, sources, tmp_path / METRICS, tmp_path / "metrics" / "scores.json")
    written = json.loads((tmp_path / METRICS).read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["stderr"]["merged"] == {"skill_add": 0.01, "skill_reverse": 0.01}
    assert written["stderr"]["sources"] == {"demo/add": {"skill_add": 0.01, "skill_reverse": 0.01}}
    assert written["stderr"]["mean"] == pytest.approx(math.sqrt(2 * 0.01**2) / 2)

    (tmp_path / OUTCOME).write_text(json.dumps({"gate_passed": True, "gate_reasons": [], "repo_id": None, "commit_sha": None}))
    monkeypatch.setattr(settings, "MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = io.StringIO()
    print_demo_report(tmp_path, Console(file=out, width=200))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in out.getvalue().splitlines() if line.count("│") == 5}
    assert rows["merged"] == ["0.600 ± 0.010", "0.850 ± 0.010", "0.725 ± 0.007"]
    assert rows["demo/add"] == ["0.800 ± 0.010", "0.000 ± 0.010", "0.400 ± 0.007"]
