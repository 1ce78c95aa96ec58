"""``jacfusion-fed evaluate``: paper-style robustness tables, curves and heatmaps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.options import deprecated, parse_gamma, parse_gamma_or_auto
from jacfusion_fed.cli.render import err, out, rich_table


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def evaluate(
    dataset: Annotated[str, typer.Option(help="avdigits or twomoon.")] = "avdigits",
    quick: Annotated[bool, typer.Option("--quick", help="Small data and sweeps (tests).")] = False,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for Markdown, CSV, JSON and PNG.")
    ] = Path("runs/evaluate"),
    repeats: Annotated[
        int | None, typer.Option(help="Redraws of the random corruptions.", min=1)
    ] = None,
    gamma: Annotated[
        list[str] | None,
        typer.Option(help="'auto' (chosen on validation; default) or a value in (0, 1]."),
    ] = None,
    gamma_grid: Annotated[
        str | None, typer.Option(help="Comma-separated candidates 'auto' chooses from.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, training and perturbations.")] = 0,
    perturbed: Annotated[
        list[str] | None, typer.Option(help="Perturbed modality (one table each).")
    ] = None,
    adaptive: Annotated[bool, typer.Option(help="Add end-to-end attack columns.")] = True,
    curves: Annotated[bool, typer.Option(help="Accuracy vs perturbation size plots.")] = True,
    retrain: Annotated[bool, typer.Option(help="Ignore the trained-model cache.")] = False,
    workers: Annotated[int, typer.Option(help="Processes that train nets.", min=1)] = 2,
    unknown: Annotated[
        bool, typer.Option("--unknown", help="Perturbed-modality-unknown table (robust fusion).")
    ] = False,
    seeds: Annotated[
        int,
        typer.Option(
            help="Training seeds seed..seed+N-1 (same data): the tables report their mean, "
            "spread and clustered intervals.",
            min=1,
        ),
    ] = 3,
    detection: Annotated[
        bool,
        typer.Option(
            "--detection",
            help="Detection table (issue 20): AUROC of each reliability signal for 'this "
            "modality is perturbed' (with --adaptive: also under the detector-aware attack).",
        ),
    ] = False,
) -> None:
    """Paper-style tables (Tables 1-2 layout), Figure 4 curves, TwoMoon heatmaps."""
    if detection and unknown:
        raise CliError("pass either --unknown or --detection, not both")
    if detection:  # issue 20: seeds seed..seed+seeds-1, the nets and data of --unknown
        from jacfusion_fed.evaluation.detection import (
            detection_markdown,
            run_detection,
            write_detection,
        )

        if dataset not in ("avdigits", "twomoon"):
            raise CliError(f"unknown dataset {dataset!r}; valid: avdigits, twomoon")
        res = run_detection(dataset, range(seed, seed + seeds), quick=quick, adaptive=adaptive)
        out().print(markdown_table(detection_markdown(res), f"{dataset}: detection AUROC"))
        paths = write_detection(res, out_dir)
        err().print(f"{dataset}: wrote {', '.join(str(p) for p in paths)}", highlight=False)
        return
    if unknown:  # issue 11: seeds seed..seed+seeds-1, hyperparameters chosen on validation
        from jacfusion_fed.evaluation.unknown_report import (
            run_unknown,
            unknown_markdown,
            write_unknown,
        )

        res = run_unknown(dataset, range(seed, seed + seeds), quick=quick, repeats=repeats or 2)
        out().print(markdown_table(unknown_markdown(res), f"{dataset}: perturbed modality unknown"))
        paths = write_unknown(res, out_dir)
        err().print(f"{dataset}: wrote {', '.join(str(p) for p in paths)}", highlight=False)
        return
    from jacfusion_fed.evaluation import config_from_options, run_evaluation, write_reports

    chosen = _gamma_choice(list(gamma or []), gamma_grid)
    config = config_from_options(
        dataset,
        quick=quick,
        repeats=repeats,
        gamma=chosen,
        seed=seed,
        seeds=seeds,
        perturbed=tuple(perturbed) if perturbed else None,
        adaptive=adaptive,
        curves=curves,
        retrain=retrain,
        workers=workers,
    )
    start = time.perf_counter()
    result = run_evaluation(config)
    elapsed = time.perf_counter() - start
    console = out()
    for table in result.tables:
        console.print(rich_table(table))
    paths = write_reports(result, out_dir)
    err().print(f"{dataset}: {elapsed:.0f} s; wrote {len(paths)} files to {out_dir}")


def _gamma_choice(gamma: list[str], grid: str | None) -> float | tuple[float, ...] | None:
    """A fixed gamma, the candidate grid for 'auto', or ``None`` (the paper's grid)."""
    if len(gamma) > 1:  # the old repeated form: several values were the grid
        grid = deprecated("--gamma V --gamma V", "--gamma-grid V,V", ",".join(gamma), grid)
        gamma = []
    fixed = parse_gamma_or_auto(gamma[0]) if gamma else None
    if grid is None:
        return fixed
    if fixed is not None:
        raise CliError("pass either --gamma VALUE or --gamma-grid, not both")
    values = [v.strip() for v in grid.split(",") if v.strip()]
    if not values:
        raise CliError("--gamma-grid needs at least one value")
    return tuple(parse_gamma(v, option="--gamma-grid") for v in values)


def markdown_table(markdown: str, title: str) -> Any:
    """The first Markdown table of ``markdown`` as a rich table (the file's own rendering, so
    the terminal and the written report show the same cells)."""
    from rich.table import Table

    lines = [line.strip() for line in markdown.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(rows[0]):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows[2:]:  # rows[1] is the |---| separator
        table.add_row(*row)
    return table
