"""``jacfusion-fed simulate``: the federated run on one machine with Flower's Simulation Engine.

Modality owners (Flower ClientApps, one simulated SuperNode each) train their unimodal nets
on their own share of a built-in dataset, the coordinator (the ServerApp) registers their
heads, gathers logits of the requester's pseudonymous evaluation ids (clean, and perturbed
by the perturbed modality's owner), fuses, and writes the paper-style robustness table.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table as RichTable

console = Console()

_DATASETS = ("avdigits", "twomoon")
_METHODS = ("regular", "adversarial", "free", "stability", "mixup")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


def rich_table(table: Any) -> RichTable:
    """A :class:`jacfusion_fed.evaluation.Table` as a rich table (same bold/arrow rules as
    the Markdown reports)."""
    from jacfusion_fed.evaluation.tables import arrows, best_cells

    arrow = arrows(table)
    bold = best_cells(table)
    out = RichTable(title=table.title, title_justify="left", show_lines=False)
    out.add_column("UM / MM")
    out.add_column("Model")
    for col in table.columns:
        out.add_column(col.label, justify="right")
    last_group = None
    for i, row in enumerate(table.rows):
        if row.group != last_group and last_group is not None:
            out.add_section()
        group = "" if row.group == last_group else ("UM Nets" if row.group == "UM" else row.group)
        last_group = row.group
        cells = []
        for col in table.columns:
            if not row.acc.get(col.key):
                cells.append("–")
                continue
            text = f"{100 * row.mean(col.key):.1f}"
            if len(row.acc[col.key]) > 1:
                text += f" ± {100 * row.std(col.key):.1f}"
            if row.kind == "jacobian" and (row.group, col.key) in arrow:
                text += f" {arrow[(row.group, col.key)]}"
            cells.append(f"[bold]{text}[/bold]" if (i, col.key) in bold else text)
        out.add_row(group, row.name, *cells)
    return out


def _gamma_line(table: Any) -> str:
    rows = [r for r in table.rows if r.gamma]
    if not rows:
        return ""
    parts = [
        f"{c.label}: {rows[0].gamma[c.key]:g}" for c in table.columns if c.key in rows[0].gamma
    ]
    return "gamma (chosen on validation): " + ", ".join(parts)


def simulate(
    dataset: Annotated[
        str, typer.Option(help="Built-in dataset: avdigits or twomoon.")
    ] = "avdigits",
    quick: Annotated[
        bool, typer.Option("--quick", help="Small data, few epochs, one draw (< 3 min on 2 cores).")
    ] = False,
    training: Annotated[
        str, typer.Option(help="Training add-on of every owner: " + ", ".join(_METHODS) + ".")
    ] = "regular",
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default per dataset).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default per dataset).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size.")] = None,
    sites_per_modality: Annotated[
        int,
        typer.Option(min=1, help="Owners (sites, disjoint patients) per modality; >1: FedAvg."),
    ] = 1,
    fedavg_rounds: Annotated[int, typer.Option(min=1, help="FedAvg rounds (several sites).")] = 3,
    full_head: Annotated[
        bool, typer.Option("--full-head", help="Owners share W and b instead of only W W^T.")
    ] = False,
    perturbed: Annotated[
        str | None, typer.Option(help="Modality to perturb (default: audio / y).")
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(help="Table columns, e.g. 'clean; gaussian w0=1; fgsm w4=0.03'."),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Draws of random perturbations (default 3; quick 1).")
    ] = None,
    gamma: Annotated[str, typer.Option(help="'auto' (chosen on validation) or a value.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of data, training and perturbations.")] = 0,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/simulate-<dataset>-<time>).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Flower/Ray logs.")] = False,
) -> None:
    """Run owners and coordinator on this machine (Flower Simulation Engine) and print the
    robustness table."""
    import logging

    from jacfusion_fed.federation.scenario import Scenario, run_scenario

    if dataset not in _DATASETS:
        raise typer.BadParameter(f"--dataset must be one of {', '.join(_DATASETS)}")
    if training not in _METHODS:
        raise typer.BadParameter(f"--training must be one of {', '.join(_METHODS)}")
    overrides: dict[str, Any] = {"training": training, "fedavg_rounds": fedavg_rounds}
    overrides["head_kind"] = "full" if full_head else "gram"
    overrides["gamma"] = gamma
    for key, value in (
        ("epochs", epochs),
        ("lr", lr),
        ("batch_size", batch_size),
        ("perturbed", perturbed),
        ("columns", columns),
        ("repeats", repeats),
    ):
        if value is not None:
            overrides[key] = value
    try:  # every run config value is checked here, once (RunConfigError)
        scenario = Scenario.builtin(
            dataset, quick=quick, sites_per_modality=sites_per_modality, seed=seed, **overrides
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if full_head:
        scenario.owners = [
            type(o)(o.name, o.modality, o.data, allow_full_head=True) for o in scenario.owners
        ]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = run_dir or Path("runs") / f"simulate-{dataset}{'-quick' if quick else ''}-{stamp}"
    owners = ", ".join(f"{o.name} ({o.modality})" for o in scenario.owners)
    console.print(
        f"[bold]Federated simulation[/bold] of {dataset}{' (quick)' if quick else ''}: {owners}"
    )
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    t0 = time.perf_counter()
    try:
        with console.status("owners training, coordinator fusing ..."):
            result = run_scenario(scenario, folder, verbose=verbose)
    except Exception as exc:
        console.print(f"[red]Simulation failed:[/red] {exc}")
        console.print(f"Run folder: {folder} (coordinator/results.json holds the error)")
        raise typer.Exit(1) from None
    finally:
        flwr_logger.setLevel(level)
    wall = time.perf_counter() - t0
    table = result.table()
    console.print(rich_table(table))
    line = _gamma_line(table)
    if line:
        console.print(line)
    heads = result.results.get("heads", {})
    console.print(
        "Heads registered: "
        + ", ".join(
            f"{m} v{h['version']} ({h['owner']}, {h['head_kind']})" for m, h in heads.items()
        )
    )
    coord = result.prepared.coordinator_dir
    console.print(f"Results: {coord / 'results.json'}; reports: {coord / 'reports'}")
    console.print(f"Wall time: {wall:.1f} s")
