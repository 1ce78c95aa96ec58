"""Render :class:`Table` objects the way the paper prints Tables 1-7 (Markdown, CSV).

Marks (interval-backed, not the paper's rule): in each ``MM (0, i)`` group, the ``Stat-w/ (ours)``
cell gets ``↑`` / ``↓`` when the 95 % paired bootstrap interval of its per-sample difference to
``Stat-w/o`` of the same group and column (same test samples, same perturbation draws) lies
above / below 0, and ``=`` (a tie) otherwise (:mod:`jacfusion_fed.evaluation.stats`, the same
code as the "perturbed modality unknown" table). A cell without per-sample correctness of both
rows (e.g. a table built by the federated evaluation, or an old results file) gets no mark: a
mark needs an interval. The extra rows (Jacobian on the clean modality, on all modalities) get
no mark. Bold marks the best displayed mean of a column over all rows (not a significance claim).
"""

from __future__ import annotations

import csv
import io
import json
import math

from .results import Row, Table
from .stats import mark, paired_bootstrap

__all__ = ["MARK_NOTE", "arrows", "intervals", "table_to_csv", "table_to_markdown"]

MARK_NOTE = (
    "Marks: Stat-w/ (ours) − Stat-w/o of the same pair, ↑ / ↓ when the 95 % paired bootstrap "
    "interval over the test samples excludes 0, = otherwise (a tie); intervals in the CSV."
)


def _pct(value: float) -> float:
    return round(100.0 * value, 1) if math.isfinite(value) else value


def intervals(table: Table) -> dict[tuple[str, str], tuple[float, float, float]]:
    """``{(group, column key): (mean, low, high)}`` of Stat-w/ (ours) − Stat-w/o in points,
    for every cell where both rows carry per-sample correctness."""
    out: dict[tuple[str, str], tuple[float, float, float]] = {}
    for group in table.groups():
        rows = {r.kind: r for r in table.rows if r.group == group}
        ours, base = rows.get("jacobian"), rows.get("statistical")
        if ours is None or base is None:
            continue
        for col in table.columns:
            a, b = ours.correct.get(col.key), base.correct.get(col.key)
            if a and b and len(a) == len(b):
                out[(group, col.key)] = paired_bootstrap(a, b)
    return out


def arrows(table: Table) -> dict[tuple[str, str], str]:
    """``{(group, column key): "↑" | "↓" | "="}`` for every Stat-w/ (ours) cell with an
    interval (see :func:`intervals`)."""
    return {key: mark(ci) for key, ci in intervals(table).items()}


def _cell(row: Row, key: str, arrow: str | None, with_std: bool) -> str:
    # No bold "best" cell: a mark needs evidence (the paired interval behind ``arrow``), and
    # the best mean of a column is often a tie within noise.
    if not row.acc.get(key):
        return "–"
    text = f"{_pct(row.mean(key)):.1f}"
    if with_std and len(row.acc[key]) > 1:
        text += f" ± {_pct(row.std(key)):.1f}"
    if arrow:
        text += f" ({arrow})"
    return text


def table_to_markdown(table: Table, *, with_std: bool = True, with_gamma: bool = True) -> str:
    """The table as GitHub Markdown: header, one line per row, group label on its first row."""
    arrow = arrows(table)
    header = ["UM / MM", "Model", *[c.label for c in table.columns]]
    lines = [
        f"**{table.title}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + [":---:"] * len(table.columns)) + "|",
    ]
    last_group = None
    for row in table.rows:
        group = "" if row.group == last_group else ("UM Nets" if row.group == "UM" else row.group)
        last_group = row.group
        cells = [
            _cell(
                row,
                c.key,
                arrow.get((row.group, c.key)) if row.kind == "jacobian" else None,
                with_std,
            )
            for c in table.columns
        ]
        lines.append("| " + " | ".join([group, row.name, *cells]) + " |")
    if arrow:
        lines += ["", MARK_NOTE]
    if with_gamma:
        lines += ["", *_gamma_lines(table)]
    if table.notes:
        lines += ["", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines) + "\n"


def _gamma_lines(table: Table) -> list[str]:
    rows = [r for r in table.rows if r.gamma]
    if not rows:
        return []
    cols = [c for c in table.columns if any(c.key in r.gamma for r in rows)]
    lines = [
        "Selected gamma (validation split) per Jacobian row:",
        "",
        "| Pair | Row | " + " | ".join(c.label for c in cols) + " |",
        "|---|---|" + "|".join([":---:"] * len(cols)) + "|",
    ]
    for r in rows:
        vals = [f"{r.gamma[c.key]:g}" if c.key in r.gamma else "–" for c in cols]
        lines.append(f"| {r.group} | {r.name} | " + " | ".join(vals) + " |")
    return lines


def table_to_csv(table: Table) -> str:
    """Long format: one line per (row, column) with mean, std, repeats, gamma, mark, the
    interval behind the mark (``diff_vs_stat_pct``: mean, low, high of Stat-w/ − Stat-w/o)
    and the per-repeat values."""
    ci = intervals(table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "table",
            "group",
            "model",
            "kind",
            "column",
            "column_label",
            "column_kind",
            "mean_pct",
            "std_pct",
            "repeats",
            "gamma",
            "arrow",
            "diff_vs_stat_pct",
            "values",
        ]
    )
    for row in table.rows:
        for col in table.columns:
            if not row.acc.get(col.key):
                continue
            cell_ci = ci.get((row.group, col.key)) if row.kind == "jacobian" else None
            writer.writerow(
                [
                    table.title,
                    row.group,
                    row.name,
                    row.kind,
                    col.key,
                    col.label,
                    col.kind,
                    f"{100 * row.mean(col.key):.2f}",
                    f"{100 * row.std(col.key):.2f}",
                    len(row.acc[col.key]),
                    row.gamma.get(col.key, ""),
                    mark(cell_ci) if cell_ci else "",
                    json.dumps([round(v, 2) for v in cell_ci]) if cell_ci else "",
                    json.dumps([round(v, 6) for v in row.acc[col.key]]),
                ]
            )
    return buf.getvalue()
