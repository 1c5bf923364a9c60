"""The main job's ends: run ``dvc repro`` in the project, then show the scores and where everything is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mergeflow.cli.stage import HUB, METRICS, OUTCOME, RELEASE


def run_dvc_repro(project: Path, console: Console) -> None:
    """``dvc repro`` in ``project`` with this environment's ``mergeflow`` and ``dvc`` first on PATH."""
    if not (project / "dvc.yaml").is_file():
        console.print(f"[red]error:[/red] no dvc.yaml in {project}: run `mergeflow demo` in the mergeflow project folder", highlight=False)
        raise typer.Exit(2)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    console.print("[bold]dvc repro[/bold]: family -> merge -> evaluate -> publish (unchanged stages are skipped)")
    code = subprocess.run([str(Path(bin_dir) / "dvc"), "repro"], cwd=project, env=env, check=False).returncode
    if code != 0:
        console.print(f"[red]error:[/red] dvc repro failed (exit {code}); the failing stage's output is above", highlight=False)
        raise typer.Exit(code)


def print_demo_report(project: Path, out: Console) -> None:
    """The scores table (merged vs each source, ± lm-eval's standard errors), the gate's verdict, and where to look next."""
    from mergeflow.evaluation import mean_score, mean_score_stderr, plus_minus
    from mergeflow.tracking import resolve_tracking_uri  # imports mlflow: only once the pipeline is done

    metrics = json.loads((project / METRICS).read_text())
    outcome = json.loads((project / OUTCOME).read_text())
    rows = {"merged": metrics["merged"], **metrics["sources"]}
    stderr = metrics.get("stderr", {})
    stderrs = {"merged": stderr.get("merged", {}), **stderr.get("sources", {})}
    tasks = list(metrics["merged"])
    table = Table(title="scores (primary metric per task ± standard error)")
    for column in ("model", *tasks, "mean"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, scores in rows.items():
        se = stderrs.get(name, {})
        cells = [plus_minus(scores[t], se.get(t), 3) if t in scores else "-" for t in tasks]
        table.add_row(name, *cells, plus_minus(mean_score(scores), mean_score_stderr(se, list(scores)), 3))
    out.print(table)
    gate = "passed" if outcome["gate_passed"] else "failed: " + "; ".join(outcome["gate_reasons"])
    published = (
        f"published: {outcome['repo_id']} @ {outcome['commit_sha']} on the local Hub (storage {HUB})"
        if outcome["repo_id"] else "not published"
    )
    tools = Path(sys.executable).parent
    tools = tools.relative_to(project) if tools.is_relative_to(project) else tools
    out.print(
        f"gate {gate}\n{published}\n"
        f"merged model with its Hub card: {RELEASE}\n"
        f"MLflow (scores, lineage, registered versions): {tools}/mlflow ui --backend-store-uri {resolve_tracking_uri()}\n"
        f"versions of every output: dvc.lock; compare: {tools}/dvc metrics show | dvc plots show | dvc exp show\n"
        f"try a variant: {tools}/dvc exp run -S merge.method=ties -S +merge.parameters.density=0.5",
        highlight=False,
    )
