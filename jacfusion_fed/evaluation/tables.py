"""Render :class:`Table` objects the way the paper prints Tables 1-7 (Markdown, CSV).

Arrows (paper's rule, read off its tables): in each ``MM (0, i)`` group, the ``Stat-w/ (ours)``
cell gets ``↑`` when its mean accuracy, rounded as displayed (0.1 %), is at least the best of
``Mean-w/o``, ``Mean-w/`` and ``Stat-w/o`` of the same group and column, ``↓`` otherwise. The
extra rows (Jacobian on the clean modality, on all modalities) get no arrow and do not enter the
comparison. Bold marks the best displayed mean of a column over all rows.
"""

from __future__ import annotations

import csv
import io
import json
import math

from .results import PAPER_MM_KINDS, Row, Table

__all__ = ["arrows", "best_cells", "table_to_csv", "table_to_markdown"]

UP, DOWN = "↑", "↓"


def _pct(value: float) -> float:
    return round(100.0 * value, 1) if math.isfinite(value) else value


def arrows(table: Table) -> dict[tuple[str, str], str]:
    """``{(group, column key): "↑" | "↓"}`` for every Stat-w/ (ours) cell with data."""
    out: dict[tuple[str, str], str] = {}
    baselines = [k for k in PAPER_MM_KINDS if k != "jacobian"]
    for group in table.groups():
        rows = {r.kind: r for r in table.rows if r.group == group}
        if "jacobian" not in rows:
            continue
        ours = rows["jacobian"]
        others = [rows[k] for k in baselines if k in rows]
        for col in table.columns:
            if not ours.acc.get(col.key):
                continue
            vals = [_pct(r.mean(col.key)) for r in others if r.acc.get(col.key)]
            if not vals:
                continue
            out[(group, col.key)] = UP if _pct(ours.mean(col.key)) >= max(vals) else DOWN
    return out


def best_cells(table: Table) -> set[tuple[int, str]]:
    """``{(row index, column key)}`` holding the best displayed mean of their column."""
    best: set[tuple[int, str]] = set()
    for col in table.columns:
        means = {i: _pct(r.mean(col.key)) for i, r in enumerate(table.rows) if r.acc.get(col.key)}
        if means:
            top = max(means.values())
            best |= {(i, col.key) for i, m in means.items() if m == top}
    return best


def _cell(row: Row, key: str, bold: bool, arrow: str | None, with_std: bool) -> str:
    if not row.acc.get(key):
        return "–"
    mean = f"{_pct(row.mean(key)):.1f}"
    text = f"**{mean}**" if bold else mean
    if with_std and len(row.acc[key]) > 1:
        text += f" ± {_pct(row.std(key)):.1f}"
    if arrow:
        text += f" ({arrow})"
    return text


def table_to_markdown(table: Table, *, with_std: bool = True, with_gamma: bool = True) -> str:
    """The table as GitHub Markdown: header, one line per row, group label on its first row."""
    arrow = arrows(table)
    bold = best_cells(table)
    header = ["UM / MM", "Model", *[c.label for c in table.columns]]
    lines = [
        f"**{table.title}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + [":---:"] * len(table.columns)) + "|",
    ]
    last_group = None
    for i, row in enumerate(table.rows):
        group = "" if row.group == last_group else ("UM Nets" if row.group == "UM" else row.group)
        last_group = row.group
        cells = [
            _cell(
                row,
                c.key,
                (i, c.key) in bold,
                arrow.get((row.group, c.key)) if row.kind == "jacobian" else None,
                with_std,
            )
            for c in table.columns
        ]
        lines.append("| " + " | ".join([group, row.name, *cells]) + " |")
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
    """Long format: one line per (row, column) with mean, std, repeats, gamma, arrow, values."""
    arrow = arrows(table)
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
            "values",
        ]
    )
    for row in table.rows:
        for col in table.columns:
            if not row.acc.get(col.key):
                continue
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
                    arrow.get((row.group, col.key), "") if row.kind == "jacobian" else "",
                    json.dumps([round(v, 6) for v in row.acc[col.key]]),
                ]
            )
    return buf.getvalue()
