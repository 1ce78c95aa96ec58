"""``jacfusion-fed deploy ...``: helpers for running the Flower app with the Deployment Engine.

- ``deploy key``: the pseudonym key (HMAC, 0600) the owners and the requester share; the
  coordinator never gets it.
- ``deploy labels``: the requester's labels file (pseudonym -> label of the evaluation ids).
- ``deploy app``: the Flower app folder (``pyproject.toml`` only) for ``flwr run``.
- ``deploy local``: everything on one machine (``--host``, default 127.0.0.1) in one
  command: certificates, SuperLink (TLS + SuperNode authentication unless ``--insecure``),
  one registered SuperNode per owner, ``flwr run``, the robustness table. Each process is
  stopped by PID at the end.
"""

from __future__ import annotations

import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from jacfusion_fed.cli.options import (
    AuditLogOpt,
    DpClipOpt,
    DpNoiseOpt,
    SecAggOpt,
    deprecated,
    private_fedavg,
)
from jacfusion_fed.cli.render import err, out, rich_table

deploy_app = typer.Typer(help="Flower Deployment Engine helpers (keys, labels, a local run).")

APP_MANIFEST = """\
# Manifest of the jacfusion Flower app for `flwr run` (written by `jacfusion-fed deploy`).
# The FAB is only this file: the code comes from the installed jacfusion-fed package.
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "jacfusion-fed"
version = "0.1.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "jacfusion"
fab-include = ["pyproject.toml"]

[tool.flwr.app.components]
serverapp = "jacfusion_fed.server.server_app:app"
clientapp = "jacfusion_fed.clients.client_app:app"

[tool.flwr.app.config]
"""


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")


def write_app_manifest(folder: Path) -> Path:
    """A minimal Flower app folder (``pyproject.toml`` only) for ``flwr run``."""
    from jacfusion_fed.federation.scenario import DEFAULT_RUN_CONFIG

    def toml(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(value)

    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {toml(v)}" for k, v in DEFAULT_RUN_CONFIG.items()]
    path = folder / "pyproject.toml"
    from jacfusion_fed.atomicio import atomic_write_bytes

    atomic_write_bytes(path, (APP_MANIFEST + "\n".join(lines) + "\n").encode("utf-8"))
    return path


@deploy_app.command("app")
def app_folder(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write pyproject.toml into.")],
) -> None:
    """Write the Flower app folder for ``flwr run OUT <connection>`` (only pyproject.toml:
    the code comes from the installed jacfusion-fed package)."""
    path = write_app_manifest(out_dir)
    err().print(f"wrote {path}: `flwr run {out_dir} <connection> --run-config run.toml`")


@deploy_app.command("key")
def key(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the key (mode 0600).")],
) -> None:
    """Create the pseudonym key shared by the owners and the requester (not the coordinator)."""
    from jacfusion_fed.privacy import generate_key, write_key

    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_key(out_file, generate_key())
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc)) from None
    err().print(
        f"wrote {out_file} (0600): give it to every owner and requester, never the coordinator"
    )


@deploy_app.command("labels")
def labels(
    data: Annotated[str, typer.Option(help="Data source of the requester's patients.")],
    modality: Annotated[str, typer.Option(help="A modality of that source.")],
    pseudonym_key: Annotated[Path, typer.Option(help="The pseudonym key.")],
    out_file: Annotated[Path, typer.Option("--out", help="The labels file to write.")],
) -> None:
    """Write the requester's evaluation labels: pseudonyms and labels of its val/test
    patients (what the coordinator needs to measure accuracy; no patient ids)."""
    from jacfusion_fed.federation.scenario import requester_splits, write_eval_labels
    from jacfusion_fed.privacy import Pseudonymizer

    splits = requester_splits(data, modality)
    write_eval_labels(out_file, Pseudonymizer.from_file(pseudonym_key), splits)
    err().print(f"wrote {out_file}: " + ", ".join(f"{s} {len(ds)} ids" for s, ds in splits.items()))


@deploy_app.command("local")
def local(
    dataset: Annotated[str, typer.Option(help="avdigits or twomoon.")] = "avdigits",
    quick: Annotated[bool, typer.Option("--quick", help="Small data, few epochs.")] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no SuperNode authentication.")
    ] = False,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default per dataset).")] = None,
    columns: Annotated[str | None, typer.Option(help="Table columns.")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (default: runs/deploy-<dataset>-<time>)."),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(hidden=True)] = None,  # renamed: --out
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run.")] = 1800.0,
    host: Annotated[
        str,
        typer.Option(help="Address the SuperLink and SuperNodes bind (0.0.0.0: every interface)."),
    ] = "127.0.0.1",
    sites_per_modality: Annotated[
        int, typer.Option(min=1, help="SuperNodes (sites) per modality; >1: FedAvg.")
    ] = 1,
    secagg: SecAggOpt = False,
    dp_clip: DpClipOpt = 0.0,
    dp_noise: DpNoiseOpt = 0.0,
    audit_log: AuditLogOpt = None,
) -> None:
    """SuperLink + one SuperNode per owner on --host, the app via ``flwr run``, the table."""
    from jacfusion_fed.federation import LocalDeployment, NodeKeys, TlsFiles, read_run_results
    from jacfusion_fed.federation.scenario import Scenario, prepare_run
    from jacfusion_fed.rpc.bind import check_bind_host, connect_host
    from jacfusion_fed.rpc.tls import is_loopback

    out_dir = deprecated("--run-dir", "--out", run_dir, out_dir)
    try:
        host = check_bind_host(host, what="Flower SuperLink and SuperNodes")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    overrides = private_fedavg(secagg, dp_clip, dp_noise, sites_per_modality, audit_log)
    if epochs is not None:
        overrides["epochs"] = epochs
    if columns is not None:
        overrides["columns"] = columns
    scenario = Scenario.builtin(
        dataset, quick=quick, sites_per_modality=sites_per_modality, **overrides
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = (out_dir or Path("runs") / f"deploy-{dataset}-{stamp}").resolve()
    status = err()
    status.print(f"run folder {folder}: data, pseudonym key, the requester's labels ...")
    prepared = prepare_run(scenario, folder)
    app_dir = folder / "app"
    write_app_manifest(app_dir)
    tls = None
    keys: dict[str, NodeKeys] = {}
    if not insecure:
        from jacfusion_fed.privacy.certs import DEFAULT_HOSTS, generate_deployment_certs

        status.print("certificates and SuperNode keys ...")
        dial = connect_host(host)  # what the SuperNodes and the SuperExec dial: in the cert
        pki = generate_deployment_certs(
            folder / "pki",
            {o.name: o.modality for o in scenario.owners},
            ["requester"],
            host_map={} if is_loopback(dial) else {"coordinator": [dial]},
            hosts=DEFAULT_HOSTS,
        )
        c = pki.coordinator_dir
        tls = TlsFiles(c / "ca.pem", c / "cert.pem", c / "key.pem")

        keys = {
            n: NodeKeys(d / "supernode_auth.key", d / "supernode_auth.pub")
            for n, d in pki.owner_dirs.items()
        }
    from jacfusion_fed.federation.scenario import DEFAULT_RUN_CONFIG

    run_config = {k: v for k, v in prepared.run_config.items() if DEFAULT_RUN_CONFIG.get(k) != v}
    if tls is not None and audit_log is not None:  # the ServerApp signs with the SuperLink's key
        run_config["audit-tls"] = str(tls.cert.parent)
    t0 = time.perf_counter()
    with LocalDeployment(
        folder / "deploy", tls=tls, insecure=insecure, node_auth=not insecure, host=host
    ) as dep:
        link = dep.start_superlink()
        status.print(
            f"SuperLink on {dep.address} ({'insecure' if insecure else 'TLS + node auth'})"
        )
        status.print("  $ " + shlex.join(link.argv))
        handles = []
        for owner, cfg in zip(scenario.owners, prepared.node_configs, strict=True):
            handle = dep.start_supernode(owner.name, cfg, keys=keys.get(owner.name), wait=False)
            handles.append(handle)
            status.print(f"SuperNode {owner.name} ({owner.modality})")
            status.print("  $ " + shlex.join(handle.process.argv))
        if not insecure:
            status.print(f"waiting for {len(handles)} SuperNodes to connect ...")
            dep.wait_online([h.node_id for h in handles], timeout=120)  # type: ignore[misc]
        status.print(
            "flwr run: owners training, coordinator fusing (three round trips of several "
            "seconds each, plus training) ..."
        )
        t_run = time.perf_counter()
        dep.run_app(app_dir, run_config, timeout=timeout)
        status.print(f"flwr run finished in {time.perf_counter() - t_run:.0f} s")
    results = read_run_results(prepared.coordinator_dir)
    from jacfusion_fed.evaluation import Column, Row, Table

    data = results["evaluation"]["table"]
    table = Table(
        **{k: v for k, v in data.items() if k not in ("columns", "rows")},
        columns=[Column(**c) for c in data["columns"]],
        rows=[Row(**r) for r in data["rows"]],
    )
    console = out()
    console.print(rich_table(table))
    console.print(f"Results: {prepared.coordinator_dir / 'results.json'}", highlight=False)
    console.print(
        f"Wall time: {time.perf_counter() - t0:.1f} s (processes stopped)", highlight=False
    )
