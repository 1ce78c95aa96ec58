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

from jacfusion_fed.cli import logs
from jacfusion_fed.cli.errors import EXIT_FAILED, CliError
from jacfusion_fed.cli.options import (
    AuditLogOpt,
    DpClipOpt,
    DpNoiseOpt,
    SecAggOpt,
    check_choice,
    deprecated,
    private_fedavg,
)
from jacfusion_fed.cli.render import err, out, rich_table

__all__ = ["register", "simulate"]

_DATASETS = ("avdigits", "twomoon")
_TRAINING = ("regular", "adversarial", "free", "stability", "mixup")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


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
        str, typer.Option(help="Training add-on of every owner: " + ", ".join(_TRAINING) + ".")
    ] = "regular",
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default per dataset).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default per dataset).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size.")] = None,
    sites_per_modality: Annotated[
        int,
        typer.Option(min=1, help="Owners (sites, disjoint patients) per modality; >1: FedAvg."),
    ] = 1,
    fedavg_rounds: Annotated[int, typer.Option(min=1, help="FedAvg rounds (several sites).")] = 3,
    secagg: SecAggOpt = False,
    dp_clip: DpClipOpt = 0.0,
    dp_noise: DpNoiseOpt = 0.0,
    audit_log: AuditLogOpt = None,
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
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (default: runs/simulate-<dataset>-<time>)."),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(hidden=True)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", hidden=True)] = False,
) -> None:
    """Run owners and coordinator on this machine (Flower Simulation Engine) and print the
    robustness table."""
    check_choice("--dataset", dataset, _DATASETS)
    check_choice("--training", training, _TRAINING)
    out_dir = deprecated("--run-dir", "--out", run_dir, out_dir)
    if deprecated("--verbose", "--log-level debug", verbose, False):
        logs.setup("debug")
    debug = logs.current_level() == "debug"
    from jacfusion_fed.federation.scenario import Scenario, run_scenario

    overrides: dict[str, Any] = {"training": training, "fedavg_rounds": fedavg_rounds}
    overrides |= private_fedavg(secagg, dp_clip, dp_noise, sites_per_modality, audit_log)
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
    except ValueError as exc:  # RunConfigError: one line naming the key and the value
        raise CliError(str(exc)) from None
    if full_head:
        scenario.owners = [
            type(o)(o.name, o.modality, o.data, allow_full_head=True) for o in scenario.owners
        ]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = out_dir or Path("runs") / f"simulate-{dataset}{'-quick' if quick else ''}-{stamp}"
    owners = ", ".join(f"{o.name} ({o.modality})" for o in scenario.owners)
    err().print(
        f"[bold]Federated simulation[/bold] of {dataset}{' (quick)' if quick else ''}: {owners}"
    )
    logs.quiet_flower()
    t0 = time.perf_counter()
    try:
        err().print("owners training, coordinator fusing ...")
        result = run_scenario(scenario, folder, verbose=debug)
    except Exception as exc:
        if debug:
            raise
        raise CliError(
            f"simulation failed: {exc} (run folder {folder}; coordinator/results.json holds "
            "the error)",
            exit_code=EXIT_FAILED,
        ) from exc
    wall = time.perf_counter() - t0
    table = result.table()
    console = out()
    console.print(rich_table(table))
    line = _gamma_line(table)
    if line:
        console.print(line, highlight=False)
    heads = result.results.get("heads", {})
    console.print(
        "Heads registered: "
        + ", ".join(
            f"{m} {h['version']} ({h['owner']}, {h['head_kind']})" for m, h in heads.items()
        ),
        highlight=False,
    )
    pooled = [m for m, h in heads.items() if int(h.get("sites", 1) or 1) > 1]
    if pooled and not any(row.kind == "robust" for row in table.rows):
        console.print(
            f"No Robust row: {', '.join(pooled)} trained on several FedAvg sites, each of which "
            "calibrates on its own data (robust fusion needs one owner's calibration per "
            "modality; docs/calibration.md).",
            highlight=False,
        )
    coord = result.prepared.coordinator_dir
    console.print(
        f"Results: {coord / 'results.json'}; reports: {coord / 'reports'}", highlight=False
    )
    console.print(f"Wall time: {wall:.1f} s", highlight=False)
