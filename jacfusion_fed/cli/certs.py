"""``jacfusion-fed certs``: the CA and every certificate of a deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _parse_owner(text: str) -> tuple[str, str]:
    name, sep, modality = text.partition("=")
    if not sep or not name.strip() or not modality.strip():
        raise typer.BadParameter(f"--owner must look like NAME=MODALITY, got {text!r}")
    return name.strip(), modality.strip()


def certs(
    out: Annotated[Path, typer.Option(help="Directory to create (ca/, coordinator/, ...).")],
    owner: Annotated[
        list[str],
        typer.Option(help="Owner NAME=MODALITY (repeat), e.g. --owner radiology=xray."),
    ],
    requester: Annotated[
        list[str] | None, typer.Option(help="Requester name (repeat); may call Predict.")
    ] = None,
    coordinator: Annotated[str, typer.Option(help="The coordinator's name.")] = "coordinator",
    days: Annotated[int, typer.Option(help="Validity of the leaf certificates.", min=1)] = 365,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="DNS name / IP in every certificate (repeat); default localhost, 127.0.0.1."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Write into an existing, non-empty directory.")
    ] = False,
) -> None:
    """Create a CA, one certificate per owner (carrying its modality), one for the coordinator
    and one per requester. Keys are written 0600 in 0700 directories; keep ca/ca.key offline."""
    from jacfusion_fed.privacy.certs import DEFAULT_HOSTS, generate_deployment_certs

    if out.exists() and any(out.iterdir()) and not force:
        raise typer.BadParameter(f"{out} exists and is not empty (pass --force to write into it)")
    owners = dict(_parse_owner(o) for o in owner)
    if len(owners) != len(owner):
        raise typer.BadParameter("owner names must be unique")
    try:
        written = generate_deployment_certs(
            out, owners, list(requester or ["requester"]), coordinator=coordinator,
            days=days, hosts=tuple(host) if host else DEFAULT_HOSTS,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    manifest = json.loads(written.manifest.read_text())
    table = Table(title=f"certificates under {out}")
    for col in ("role", "name", "modality", "directory", "expires"):
        table.add_column(col)
    for p in manifest["principals"]:
        table.add_row(p["role"], p["name"], p["modality"] or "", p["dir"], p["not_after"][:10])
    console.print(table)
    console.print(f"CA: {written.ca_dir / 'ca.pem'} (keep {written.ca_dir / 'ca.key'} offline)")


def register(app: typer.Typer) -> None:
    app.command("certs")(certs)
