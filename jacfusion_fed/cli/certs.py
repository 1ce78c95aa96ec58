"""``jacfusion-fed certs``: the CA and every certificate of a deployment.

Single machine (every certificate names ``localhost`` and ``127.0.0.1``)::

    jacfusion-fed certs --out pki --owner vision-co=image --owner audio-co=audio \\
        --requester hospital

Several machines: each identity names the host names / IPs of its own machine after ``@``
(loopback only with ``--loopback``)::

    jacfusion-fed certs --out pki --coordinator-name coordinator@coord.example.org,10.0.0.1 \\
        --owner vision-co=image@img.example.org,10.0.0.2 \\
        --owner audio-co=audio@aud.example.org,10.0.0.3 --requester hospital
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from jacfusion_fed.cli.options import deprecated
from jacfusion_fed.cli.render import err, new_table, out


def _split_hosts(text: str, option: str) -> tuple[str, list[str]]:
    """``"NAME@h1,h2"`` -> ``("NAME", ["h1", "h2"])`` (the last ``@`` starts the hosts)."""
    head, sep, tail = text.rpartition("@")
    if not sep:
        return text.strip(), []
    hosts = [h.strip() for h in tail.split(",")]
    if not head.strip() or not all(hosts):
        raise typer.BadParameter(f"{option} must look like NAME@HOST[,HOST...], got {text!r}")
    return head.strip(), hosts


def _parse_owner(text: str) -> tuple[str, str, list[str]]:
    name, sep, rest = text.partition("=")
    modality, hosts = _split_hosts(rest, "--owner") if sep else ("", [])
    if not sep or not name.strip() or not modality:
        raise typer.BadParameter(f"--owner must look like NAME=MODALITY[@HOST,...], got {text!r}")
    return name.strip(), modality, hosts


def certs(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory to create (ca/, coordinator/, ...).")
    ],
    owner: Annotated[
        list[str],
        typer.Option(
            help="Owner NAME=MODALITY or NAME=MODALITY@HOST,HOST (repeat): e.g. --owner "
            "radiology=xray, or "
            "--owner vision-co=image@img.example.org,10.0.0.2 with the DNS names / IPs of "
            "the owner's machine."
        ),
    ],
    requester: Annotated[
        list[str] | None,
        typer.Option(help="Requester NAME (repeat); may call Predict (client certificate)."),
    ] = None,
    coordinator_name: Annotated[
        str,
        typer.Option(
            "--coordinator-name",
            help="The coordinator's certificate NAME or NAME@HOST,HOST: list every address the "
            "SuperLink is dialled at (the owners' --superlink host and the SuperLink's --host; "
            "with --host 0.0.0.0 its SuperExec dials 127.0.0.1, so list that too).",
        ),
    ] = "coordinator",
    # renamed: elsewhere --coordinator is the coordinator's HOST[:PORT]; kept for one release
    coordinator: Annotated[str | None, typer.Option("--coordinator", hidden=True)] = None,
    days: Annotated[int, typer.Option(help="Validity of the leaf certificates.", min=1)] = 365,
    host: Annotated[
        list[str] | None,
        typer.Option(help="DNS name / IP added to EVERY certificate (repeat; rarely needed)."),
    ] = None,
    loopback: Annotated[
        bool | None,
        typer.Option(
            "--loopback/--no-loopback",
            help="Add localhost and 127.0.0.1 to every certificate. Default: on unless an "
            "identity names its own hosts (NAME@HOST), i.e. on for the single-machine form.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Write into an existing, non-empty directory.")
    ] = False,
) -> None:
    """Create a CA, one certificate per owner (carrying its modality), one for the coordinator
    and one per requester, each valid for its own machine's names. Keys are written 0600 in
    0700 directories; keep ca/ca.key offline.

    One machine: certs --out pki --owner vision-co=image --owner audio-co=audio

    Several machines: certs --out pki --coordinator-name coordinator@10.0.0.1
    --owner vision-co=image@img.example.org,10.0.0.2 --owner audio-co=audio@10.0.0.3
    --requester hospital
    """
    from jacfusion_fed.privacy.certs import DEFAULT_HOSTS, generate_deployment_certs

    coordinator_name = deprecated(
        "--coordinator", "--coordinator-name", coordinator, coordinator_name
    )
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise typer.BadParameter(
            f"{out_dir} exists and is not empty (pass --force to write into it)"
        )
    parsed = [_parse_owner(o) for o in owner]
    owners = {name: modality for name, modality, _ in parsed}
    if len(owners) != len(owner):
        raise typer.BadParameter("owner names must be unique")
    host_map = {name: hosts for name, _, hosts in parsed if hosts}
    coord_name, coord_hosts = _split_hosts(coordinator_name, "--coordinator-name")
    if coord_hosts:
        host_map[coord_name] = coord_hosts
    requesters: list[str] = []
    for text in requester or ["requester"]:
        name, hosts = _split_hosts(text, "--requester")
        requesters.append(name)
        if hosts:
            host_map[name] = hosts
    shared = list(host or [])
    if loopback is None:  # single-machine form (no NAME@HOST): loopback, plus any --host
        loopback = not host_map
    if loopback:
        shared = [*DEFAULT_HOSTS, *shared]
    try:
        written = generate_deployment_certs(
            out_dir,
            owners,
            requesters,
            coordinator=coord_name,
            days=days,
            hosts=tuple(shared),
            host_map=host_map,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    manifest = json.loads(written.manifest.read_text())
    table = new_table(
        f"certificates under {out_dir}",
        ["role", "name", "modality", "hosts", "directory", "expires"],
    )
    for p in manifest["principals"]:
        table.add_row(
            p["role"],
            p["name"],
            p["modality"] or "",
            ", ".join(p["hosts"]) or "-",
            p["dir"],
            p["not_after"][:10],
        )
    out().print(table)
    status = err()
    status.print(f"CA: {written.ca_dir / 'ca.pem'} (keep {written.ca_dir / 'ca.key'} offline)")
    if not loopback:
        status.print(
            "no loopback names: a server is reachable only at the names listed "
            "(pass --loopback to add localhost and 127.0.0.1)"
        )


def register(app: typer.Typer) -> None:
    app.command("certs")(certs)
