"""A PNG bar chart of the merged model against its sources, one group of bars per task (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path


def plot_scores(merged: dict[str, float], sources: dict[str, dict[str, float]], out: Path, *, title: str = "merged vs sources") -> Path:
    """Write a grouped bar chart: for each task of ``merged``, the merged model's bar first, then each source's.

    Args:
        merged: task -> score of the merged model.
        sources: source name -> (task -> score); tasks a source lacks are left blank.
        out: the PNG file to write (its folder is created).

    Example:
        >>> plot_scores({"skill_add": 0.6}, {"add": {"skill_add": 0.9}}, Path("chart.png"))
        PosixPath('chart.png')
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker threads and processes
    from matplotlib.figure import Figure

    tasks = list(merged)
    series = {"merged": merged, **sources}
    width = 0.8 / max(len(series), 1)
    figure = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(tasks) * len(series) * 0.45), 3.6), dpi=100)
    axes = figure.add_subplot()
    for i, (name, scores) in enumerate(series.items()):
        xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(tasks))]
        values = [scores.get(task, float("nan")) for task in tasks]
        bars = axes.bar(xs, values, width, label=name, edgecolor="black" if name == "merged" else None)
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20 if len(tasks) > 4 else 0)
    axes.set_ylabel("score")
    axes.set_ylim(0, max([1.0, *(v for s in series.values() for v in s.values() if not math.isnan(v))]) * 1.12)
    axes.set_title(title)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", metadata={"Software": None})
    return out
