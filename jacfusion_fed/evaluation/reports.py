"""``write_reports``: Markdown, CSV, JSON and PNG files of an :class:`EvaluationResult`."""

from __future__ import annotations

import json
from pathlib import Path

from .plots import plot_curves, plot_heatmaps
from .results import EvaluationResult
from .tables import table_to_csv, table_to_markdown

__all__ = ["write_reports"]


def _summary(result: EvaluationResult) -> str:
    cfg = result.config
    lines = [
        f"# Evaluation: {cfg['dataset']}" + (" (quick)" if cfg.get("quick") else ""),
        "",
        f"data seed {cfg['seed']}, {cfg.get('seeds', 1)} training seed(s) from it, "
        f"repeats {cfg['repeats']}, "
        f"gamma {cfg['gamma'] if cfg['gamma'] is not None else 'selected on validation'}, "
        f"torch {result.environment.get('torch')}, {result.environment.get('threads')} threads.",
        "",
        "Run time (s): "
        + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in result.timings.items()),
        "",
        "| Net | cached | train s | train acc | test acc |",
        "|---|:---:|---:|---:|---:|",
    ]
    for name, info in result.models.items():
        lines.append(
            f"| {name} | {'yes' if info.get('cached') else 'no'} | "
            f"{info.get('train_seconds', float('nan')):.1f} | "
            f"{100 * info.get('train_accuracy', float('nan')):.1f} | "
            f"{100 * info.get('test_accuracy', float('nan')):.1f} |"
        )
    for table in result.tables:
        lines += ["", table_to_markdown(table)]
    return "\n".join(lines) + "\n"


def write_reports(result: EvaluationResult, out_dir: Path | str) -> list[Path]:
    """Write every report of ``result`` under ``out_dir`` (created if needed).

    Files (``<ds>`` = dataset, ``<mod>`` = perturbed modality):
        ``<ds>.md`` (summary: run times, nets, all tables), ``<ds>.json`` (everything but the
        heatmap arrays), ``<ds>-<mod>.md`` / ``.csv`` per table, ``<ds>-<mod>-curves.png``
        (Figure 4 style) when curves were computed, and for TwoMoon ``twomoon-fig2.png`` /
        ``twomoon-fig3.png``.

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = result.config["dataset"]
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)

    write(f"{ds}.md", _summary(result))
    write(f"{ds}.json", json.dumps(result.to_json_dict(), indent=1, default=float) + "\n")
    for table in result.tables:
        write(f"{ds}-{table.perturbed}.md", table_to_markdown(table))
        write(f"{ds}-{table.perturbed}.csv", table_to_csv(table))
        curves = [c for c in result.curves if c.table == table.title]
        if curves:
            title = f"{table.title}: MM (0, 1), Stat-w/o vs Stat-w/"
            written.append(plot_curves(curves, out / f"{ds}-{table.perturbed}-curves.png", title))
    if result.heatmaps:
        uni = {k: v for k, v in result.heatmaps.items() if k.startswith("unimodal/")}
        multi = {k: v for k, v in result.heatmaps.items() if k.startswith("multimodal-")}
        if uni:
            written.append(
                plot_heatmaps(
                    uni, out / "twomoon-fig2.png", "TwoMoon, unimodal (Figure 2)", ["unimodal"]
                )
            )
        if multi:
            written.append(
                plot_heatmaps(
                    multi,
                    out / "twomoon-fig3.png",
                    "TwoMoon, multimodal, Y perturbed (Figure 3)",
                    ["multimodal-small", "multimodal-large"],
                )
            )
    return written
