"""Helpers for the evaluate -> track -> gate -> publish tests: paths, synthetic eval results, a Hub lineage."""
from __future__ import annotations

import json
from pathlib import Path

from mergeflow.evaluation import EvalResult
from mergeflow.lineage import Lineage
from mergeflow.sources import Source

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"


def fake_eval(folder: Path, scores: dict[str, float], raw_dir: Path, *, name: str) -> EvalResult:
    """An EvalResult with ``exact_match`` scores and a raw JSON file, without running lm-eval."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / f"{name}.results.json"
    raw.write_text(json.dumps({"results": {t: {"exact_match,none": v} for t, v in scores.items()}, "config": {"limit": 40}}))
    return EvalResult(
        model_dir=folder, content_hash=f"hash-{name}", cache_key=f"key-{name}", tasks=list(scores),
        metrics={t: {"exact_match": v, "exact_match_stderr": 0.01} for t, v in scores.items()},
        primary={t: "exact_match" for t in scores}, groups=[], raw_path=raw, lm_eval_version="0.4.13", seconds=1.0,
    )


def hub_lineage(output_hash: str = "f" * 64) -> Lineage:
    """The lineage of a ties merge of three Hub models pinned to commits."""
    sources = [
        Source(key="mergeflow/base", repo_id="mergeflow/base", commit_sha="a" * 40, is_base=True),
        Source(key="mergeflow/ft_a@main", repo_id="mergeflow/ft_a", revision="main", commit_sha="b" * 40),
        Source(key="mergeflow/ft_b", repo_id="mergeflow/ft_b", commit_sha="c" * 40),
    ]
    return Lineage(method="ties", recipe_sha256="d" * 64, base_model="mergeflow/base", sources=sources,
                   output_hash=output_hash, output_bytes=1234, git_commit="e" * 40, git_dirty=False)
