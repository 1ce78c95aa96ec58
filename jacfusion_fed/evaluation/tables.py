"""Render :class:`Table` objects the way the paper prints Tables 1-7 (Markdown, CSV).

Marks (interval-backed, not the paper's rule): in each ``MM (0, i)`` group, the ``Stat-w/ (ours)``
and ``Stat-w/ centered logits`` cells get ``↑`` / ``↓`` / ``=`` from the cluster bootstrap of
their per-sample difference to ``Stat-w/o`` of the same group and column (same test samples,
same perturbation draws; with several training seeds every seed of a test sample is resampled
together), Holm-corrected over all the marks of the table
(:mod:`jacfusion_fed.evaluation.stats`, the same code as the "perturbed modality unknown"
table). A cell without per-sample correctness of both rows (e.g. a table built by the
federated evaluation, or an old results file) gets no mark: a mark needs an interval. The
other extra rows (Jacobian on the clean modality, on all modalities) get no mark. No cell is
bold: the best mean of a column is often a tie within noise.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from .results import Row, Table
from .stats import cluster_bootstrap, holm_marks

__all__ = [
    "MARKED_KINDS",
    "MARK_NOTE",
    "arrows",
    "centered_summary",
    "compare_rows",
    "intervals",
    "table_to_csv",
    "table_to_markdown",
]

MARKED_KINDS: tuple[str, ...] = ("jacobian", "jacobian_centered")
"""Rows marked against Stat-w/o of the same pair."""

MARK_NOTE = (
    "Marks: Stat-w/ (ours) and Stat-w/ centered logits − Stat-w/o of the same pair; the "
    "cluster bootstrap over test samples (every training seed of a sample resampled together); "
    "↑ / ↓ when the Holm-adjusted p-value over all the marks of this table is below 0.05, "
    "= otherwise (a tie); the 95 % intervals (not adjusted), p-values and the seed spread of "
    "each difference are in the CSV (diff_vs_stat_pct)."
)


def _pct(value: float) -> float:
    return round(100.0 * value, 1) if math.isfinite(value) else value


def intervals(table: Table) -> dict[tuple[str, str, str], dict[str, float]]:
    """``{(group, row kind, column key): cluster bootstrap result}`` (points) of each marked
    row (:data:`MARKED_KINDS`) − Stat-w/o, for every cell where both rows carry per-sample
    correctness (per seed when the table has several training seeds)."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for group in table.groups():
        rows = {r.kind: r for r in table.rows if r.group == group}
        base = rows.get("statistical")
        if base is None:
            continue
        for kind in MARKED_KINDS:
            ours = rows.get(kind)
            if ours is None:
                continue
            for col in table.columns:
                a, b = _per_seed(ours, col.key), _per_seed(base, col.key)
                if a and b and len(a) == len(b) and len(a[0]) == len(b[0]):
                    out[(group, kind, col.key)] = cluster_bootstrap(a, b)
    return out


def _per_seed(row: Row, key: str) -> list[list[float]] | None:
    if row.correct_seeds.get(key):
        return row.correct_seeds[key]
    return [row.correct[key]] if row.correct.get(key) else None


def compare_rows(table: Table, kind_a: str, kind_b: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(group, column key): cluster bootstrap result}`` of row ``kind_a`` − row ``kind_b``
    of the same pair (e.g. the centered-logits row against the paper's Stat-w/ (ours)), with
    its Holm-corrected mark over the table under ``"mark"``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for group in table.groups():
        rows = {r.kind: r for r in table.rows if r.group == group}
        if kind_a not in rows or kind_b not in rows:
            continue
        for col in table.columns:
            a, b = _per_seed(rows[kind_a], col.key), _per_seed(rows[kind_b], col.key)
            if a and b and len(a) == len(b) and len(a[0]) == len(b[0]):
                out[(group, col.key)] = cluster_bootstrap(a, b)
    marks = holm_marks(out)
    return {k: {**v, "mark": marks[k]} for k, v in out.items()}


def centered_summary(table: Table) -> str | None:
    """One line: how the centered-logits row compares with the paper's Stat-w/ (ours), cell by
    cell (None when the table has no centered row)."""
    cmp = compare_rows(table, "jacobian_centered", "jacobian")
    if not cmp:
        return None
    n = {m: sum(v["mark"] == m for v in cmp.values()) for m in ("↑", "=", "↓")}
    return (
        "Stat-w/ centered logits − Stat-w/ (ours), per pair and column (cluster bootstrap, "
        f"Holm over the {len(cmp)} cells): {n['↑']} ↑, {n['=']} =, {n['↓']} ↓."
    )


def arrows(table: Table) -> dict[tuple[str, str, str], str]:
    """``{(group, row kind, column key): "↑" | "↓" | "="}`` for every marked cell with an
    interval (see :func:`intervals`), Holm-corrected over the table."""
    return holm_marks(intervals(table))


def _cell(row: Row, key: str, arrow: str | None, with_std: bool) -> str:
    # No bold "best" cell: a mark needs evidence (the paired interval behind ``arrow``), and
    # the best mean of a column is often a tie within noise.
    if not row.acc.get(key):
        return "–"
    text = f"{_pct(row.mean(key)):.1f}"
    seeds = row.seed_acc.get(key, [])
    if with_std and len(seeds) > 1:  # the seed spread
        text += f" ± {_pct(float(np.std(seeds, ddof=1))):.1f}"
    elif with_std and len(row.acc[key]) > 1:
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
                arrow.get((row.group, row.kind, c.key)),
                with_std,
            )
            for c in table.columns
        ]
        lines.append("| " + " | ".join([group, row.name, *cells]) + " |")
    if arrow:
        lines += ["", MARK_NOTE]
    centered = centered_summary(table)
    if centered:
        lines += ["", centered]
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
    with its p-value, seed spread and Holm-corrected mark, the per-seed means and the
    per-repeat values)."""
    ci = intervals(table)
    marks = holm_marks(ci)
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
            "seed_means_pct",
            "values",
        ]
    )
    for row in table.rows:
        for col in table.columns:
            if not row.acc.get(col.key):
                continue
            cell_ci = ci.get((row.group, row.kind, col.key))
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
                    marks.get((row.group, row.kind, col.key), ""),
                    json.dumps({k: round(v, 4) for k, v in cell_ci.items()}) if cell_ci else "",
                    json.dumps([round(100 * v, 2) for v in row.seed_acc.get(col.key, [])]),
                    json.dumps([round(v, 6) for v in row.acc[col.key]]),
                ]
            )
    return buf.getvalue()
