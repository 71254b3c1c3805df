"""Rich tables for people (the CLI's non-JSON output)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from fapecli.planning.plan import Plan


def plan_table(rows: Sequence[tuple[str, Plan]], *, verbose: bool = False) -> Table:
    table = Table(show_lines=False, header_style="bold")
    table.add_column("image", overflow="fold")
    table.add_column("task")
    table.add_column("band")
    table.add_column("also")
    table.add_column("rationale", overflow="fold")
    if verbose:
        table.add_column("pipeline", overflow="fold")
        table.add_column("scores", overflow="fold")
    for path, plan in rows:
        cells = [path, plan.task, plan.band, ", ".join(plan.secondary) or "-", plan.rationale]
        if verbose:
            cells.append(" -> ".join(plan.pipeline))
            cells.append(" ".join(f"{k}={v:.2f}" for k, v in plan.scores.items()))
        table.add_row(*cells)
    return table


def plan_compare_table(
    rows: Sequence[tuple[str, Plan, Plan | None]], *, verbose: bool = False
) -> Table:
    """`fape plan --planner both`: per image the Qwen plan (or its rule fallback) beside the
    rule planner's, and whether their tasks agree."""
    table = Table(show_lines=False, header_style="bold")
    table.add_column("image", overflow="fold")
    table.add_column("rules")
    table.add_column("qwen")
    table.add_column("agree")
    table.add_column("qwen rationale", overflow="fold")
    if verbose:
        table.add_column("rules rationale", overflow="fold")
        table.add_column("qwen answer", overflow="fold")
    for path, qwen, rules in rows:
        rules = rules or qwen
        shown = f"{qwen.task} ({qwen.band})"
        if qwen.fallback:
            shown += " [rules fallback]"
        agree = "[green]yes[/green]" if qwen.task == rules.task else "[red]no[/red]"
        why = qwen.fallback if qwen.fallback else qwen.rationale
        cells = [escape(path), f"{rules.task} ({rules.band})", escape(shown), agree, escape(why)]
        if verbose:
            cells += [escape(rules.rationale), escape(qwen.raw or "-")]
        table.add_row(*cells)
    return table


def weights_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(header_style="bold")
    for col in ("name", "kind", "present", "path", "licence"):
        table.add_column(col, overflow="fold")
    for r in rows:
        present = "[green]yes[/green]" if r["present"] else "[red]no[/red]"
        table.add_row(r["name"], r["kind"], present, r["path"] or "-", r["licence"] or "-")
    return table


def score_table(report: Any, directions: dict[str, str], *, summary_only: bool = False) -> Table:
    """Per-image scores (unless summary_only) followed by mean and std of each metric."""
    arrows = {"higher": " ↑", "lower": " ↓"}
    table = Table(header_style="bold", show_footer=False)
    table.add_column("image", overflow="fold")
    for m in report.metrics:
        table.add_column(m + arrows.get(directions.get(m, ""), ""), justify="right")
    if not summary_only:
        for row in report.rows:
            table.add_row(row.name, *(_fmt(row.values.get(m)) for m in report.metrics))
        table.add_section()
    for label, attr in (("mean", "mean"), ("std", "std")):
        cells = [
            _fmt(getattr(report.summary[m], attr)) if m in report.summary else "-"
            for m in report.metrics
        ]
        table.add_row(f"[bold]{label}[/bold]", *cells)
    return table


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
