"""``mergeflow extract-lora``'s summary: the modules (the worst when there are many), what was left out, the errors."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from merge_ops.lora_extract import REMEDIES, ExtractionReport


def print_extraction(report: ExtractionReport, out: Console, *, show: int, max_error: float | None, footer: str) -> None:
    """Tables of the extracted modules and of the changed tensors not captured, then one line per outcome."""
    modules = report.modules if len(report.modules) <= show else sorted(report.modules, key=lambda m: -m.error)[:show]
    title = f"{len(report.modules)} module(s) extracted" if len(modules) == len(report.modules) else f"the {show} worst of {len(report.modules)} modules"
    table = Table(title=title)
    for column in ("module", "kind", "shape", "rank", "relative error"):
        table.add_column(column, justify="left" if column in ("module", "kind") else "right")
    for m in modules:
        error = f"{m.error:.4g}"
        table.add_row(m.module, m.kind, "x".join(map(str, m.shape)), str(m.rank), f"[yellow]{error}[/yellow]" if max_error is not None and m.error > max_error else error)
    out.print(table)
    if report.not_captured:
        lost = sorted(report.not_captured, key=lambda t: -t.relative_change)
        left = Table(title=f"{len(lost)} changed tensor(s) not captured" + (f" (the {show} largest relative changes)" if len(lost) > show else ""))
        for column in ("tensor", "shape", "relative change", "why"):
            left.add_column(column, justify="right" if column in ("shape", "relative change") else "left")
        for t in lost[:show]:
            left.add_row(t.tensor, "x".join(map(str, t.shape)), f"{t.relative_change:.4g}", t.reason)
        out.print(left)
        for reason in dict.fromkeys(t.reason for t in lost):
            out.print(f"  {reason}: {REMEDIES[reason]}", highlight=False)
    ranks = sorted({m.rank for m in report.modules})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    over = [m.module for m in report.modules if max_error is not None and m.error > max_error]
    lines = [
        f"{len(report.modules)} modules, {rank_text}; overall relative error {report.overall_error:.4g} (extracted modules), "
        f"{report.total_error:.4g} of the whole task vector",
        f"{len(report.saved)} module(s) stored whole (modules_to_save); {len(report.unchanged)} unchanged tensor(s) skipped; "
        f"{len(report.not_captured)} changed tensor(s) not captured",
    ]
    if over:
        lines.append(f"[yellow]{len(over)} module(s) over the error budget at --max-rank[/yellow]: {', '.join(over[:5])}" + (" ..." if len(over) > 5 else ""))
    lines.append(f"adapter {report.out} (sha256 {report.sha256[:16]}...), {footer}")
    for line in lines:
        out.print(line, highlight=False)
