"""``jacfusion-fed evaluate``: paper-style robustness tables, curves and heatmaps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def evaluate(
    dataset: Annotated[str, typer.Option(help="avdigits or twomoon.")] = "avdigits",
    quick: Annotated[bool, typer.Option("--quick", help="Small data and sweeps (tests).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for Markdown, CSV, JSON and PNG.")] = Path(
        "runs/evaluate"
    ),
    repeats: Annotated[
        int | None, typer.Option(help="Redraws of the random corruptions.", min=1)
    ] = None,
    gamma: Annotated[
        list[float] | None,
        typer.Option(help="One value fixes gamma; several replace the grid chosen from."),
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
    seeds: Annotated[int, typer.Option(help="Training seeds of --unknown.", min=1)] = 3,
) -> None:
    """Paper-style tables (Tables 1-2 layout), Figure 4 curves, TwoMoon heatmaps."""
    if unknown:  # issue 11: seeds seed..seed+seeds-1, hyperparameters chosen on validation
        from jacfusion_fed.evaluation.unknown_report import run_unknown, write_unknown

        res = run_unknown(dataset, range(seed, seed + seeds), quick=quick, repeats=repeats or 2)
        console.print(f"{dataset}: wrote {write_unknown(res, out)}")
        return
    from jacfusion_fed.cli.simulate import rich_table
    from jacfusion_fed.evaluation import config_from_options, run_evaluation, write_reports

    try:
        config = config_from_options(
            dataset, quick=quick, repeats=repeats, gamma=gamma or None, seed=seed,
            perturbed=tuple(perturbed) if perturbed else None, adaptive=adaptive,
            curves=curves, retrain=retrain, workers=workers,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    start = time.perf_counter()
    result = run_evaluation(config)
    elapsed = time.perf_counter() - start
    for table in result.tables:
        console.print(rich_table(table))
    paths = write_reports(result, out)
    console.print(f"{dataset}: {elapsed:.0f} s; wrote {len(paths)} files to {out}")
