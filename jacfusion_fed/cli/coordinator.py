"""``jacfusion-fed coordinator serve`` and ``coordinator info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from jacfusion_fed.cli.audit import open_audit_log
from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.options import (
    DEFAULT_COORDINATOR_PORT,
    FUSION_METHODS,
    AuditFsyncOpt,
    AuditLogOpt,
    AuditRotateOpt,
    CoordinatorOpt,
    HostOpt,
    InsecureOpt,
    JsonOpt,
    MaxStreamsPerPeerOpt,
    MetricsPortOpt,
    PortFileOpt,
    TimeoutOpt,
    TlsOpt,
    TraceFileOpt,
    check_choice,
    parse_gamma,
)
from jacfusion_fed.cli.render import err, method_name, new_table, out, print_json
from jacfusion_fed.cli.transport import (
    bind_host,
    check_port_free,
    coordinator_stub,
    peer_limits,
    rpc_failure,
    say_metrics_url,
    security,
    serve_until_signal,
    start_tracing,
)

__all__ = ["coordinator_info", "coordinator_serve", "open_registry", "register"]


def coordinator_serve(
    registry: Annotated[
        str,
        typer.Option(
            help="Head registry: a directory (SQLite inside), a .sqlite3 file, or a "
            "postgresql:// URI shared by replicas on several hosts."
        ),
    ],
    owner: Annotated[
        list[str] | None,
        typer.Option(help="MODALITY=HOST:PORT[,HOST:PORT...]: a modality's sites (repeat)."),
    ] = None,
    sites: Annotated[
        Path | None,
        typer.Option(help='JSON sites file: {"MODALITY": ["HOST:PORT", ...], ...}.'),
    ] = None,
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    host: HostOpt = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to bind; 0 picks a free one.", min=0)
    ] = DEFAULT_COORDINATOR_PORT,
    port_file: PortFileOpt = None,
    method: Annotated[
        str,
        typer.Option(
            help=f"Fusion method unless a request names one: {', '.join(FUSION_METHODS)}."
        ),
    ] = "jacobian",
    gamma: Annotated[str, typer.Option(help="Gamma in (0, 1] unless a request names one.")] = "0.5",
    iterations: Annotated[int, typer.Option(help="Default solver iterations.", min=1)] = 1,
    owner_timeout: Annotated[float, typer.Option(help="Default per-owner timeout (s).")] = 2.0,
    max_batch: Annotated[int, typer.Option(help="Most ids per Predict.", min=1)] = 65_536,
    device: Annotated[
        str | None, typer.Option(help="Fusion device (default: cuda if any).")
    ] = None,
    fusion_batching: Annotated[
        bool, typer.Option(help="Fuse concurrent requests with equal options together.")
    ] = True,
    max_workers: Annotated[int, typer.Option(help="Handler threads.", min=1)] = 16,
    max_streams_per_peer: MaxStreamsPerPeerOpt = None,
    metrics_port: MetricsPortOpt = None,
    audit_log: AuditLogOpt = None,
    audit_rotate: AuditRotateOpt = "64MiB",
    audit_fsync: AuditFsyncOpt = "entry",
    trace_file: TraceFileOpt = None,
) -> None:
    """Serve FusionService (Predict, PredictStream, GetModelInfo) until SIGTERM."""
    check_choice("--method", method, FUSION_METHODS)
    default_gamma = parse_gamma(gamma)
    sec = security(tls, insecure)
    host = bind_host(host, "coordinator FusionService")
    check_port_free(host, port)
    limits = peer_limits(max_workers, metrics_port, max_streams_per_peer)
    start_tracing("jacfusion-coordinator", trace_file)
    from jacfusion_fed.server.coordinator import Coordinator
    from jacfusion_fed.server.predict_types import CoordinatorConfig
    from jacfusion_fed.server.serve import serve_coordinator
    from jacfusion_fed.server.sites import load_sites, parse_owners, sites_by_modality
    from jacfusion_fed.store import CorruptFileError

    if bool(owner) == (sites is not None):
        raise CliError("pass either --owner (one per modality) or --sites FILE")
    try:
        endpoints = load_sites(sites) if sites is not None else parse_owners(owner or [])
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    config = CoordinatorConfig(
        default_method=method,
        default_gamma=default_gamma,
        default_iterations=iterations,
        max_iterations=max(16, iterations),
        owner_timeout_s=owner_timeout,
        max_batch=max_batch,
        device=device,
        batch_fusion=fusion_batching,
    )
    heads = open_registry(registry)
    try:
        coordinator = Coordinator(heads, endpoints, sec, config)
    except CorruptFileError as exc:  # refuse to start on a damaged registry, never use it
        raise CliError(
            f"the head registry is damaged, refusing to start: {exc}; delete that entry "
            "(the previous entry of that modality becomes current and the owner's current "
            'head is fetched again), e.g. sqlite3 DIR/registry.sqlite3 "DELETE FROM heads '
            "WHERE modality='M' AND sequence=N\" (in PostgreSQL: table jacfusion_heads), "
            "then restart"
        ) from exc
    from jacfusion_fed.audit import service_identity
    from jacfusion_fed.rpc.tls import TlsFiles

    cn = "coordinator"
    if isinstance(sec, TlsFiles):
        from jacfusion_fed.rpc.identity import principal_from_certificate

        cn = principal_from_certificate(sec.cert).name
    audit = open_audit_log(
        audit_log, audit_rotate, sec, service_identity("coordinator", cn), fsync=audit_fsync
    )
    try:
        running = serve_coordinator(
            coordinator,
            sec,
            host=host,
            port=port,
            max_workers=max_workers,
            metrics_port=metrics_port,
            limits=limits,
            audit=audit,
        )
    except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
        raise CliError(f"cannot serve on {host}:{port}: {exc}") from exc
    err().print(
        f"coordinator serving on {running.target} (fusion on {coordinator.device}); owners: "
        + ", ".join(f"{m}={','.join(t)}" for m, t in sites_by_modality(endpoints).items())
    )
    say_metrics_url(running)
    serve_until_signal(running, "coordinator", port_file)


def open_registry(target: str) -> Any:
    """The head registry ``--registry`` names (a directory, an SQLite file, a PostgreSQL URI;
    the rule: :func:`jacfusion_fed.store.registry_backends.open_backend`), or a one-line
    error: 2 for a bad value or a damaged registry, 1 when the database cannot be reached."""
    from jacfusion_fed.store import CorruptFileError, HeadRegistry
    from jacfusion_fed.store.sqlite_db import StoreUnavailableError

    try:
        return HeadRegistry(target)
    except CorruptFileError as exc:
        raise CliError(f"the head registry is damaged, refusing to start: {exc}") from exc
    except (StoreUnavailableError, TimeoutError) as exc:
        raise CliError(f"cannot open the head registry: {exc}", exit_code=1) from exc
    except (ValueError, OSError) as exc:
        raise CliError(f"--registry {target}: {exc}") from exc


def info_payload(info: Any) -> dict[str, Any]:
    """``GetModelInfoResponse`` as JSON, with the names the tables show."""
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2

    return {
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "class_prior": list(info.class_prior),
        "default_method": method_name(fusion_pb2.FusionMethod.Name(info.default_method)),
        "modalities": [
            {
                "modality": m.modality,
                "owner": m.owner,
                "model_version": m.model_version,
                "num_classes": m.num_classes,
                "class_counts": list(m.class_counts),
                "head_kind": modality_pb2.HeadKind.Name(m.head_kind)
                .removeprefix("HEAD_KIND_")
                .lower(),
                "registered_at": m.registered_at.ToDatetime().isoformat() + "Z",
                **(
                    {
                        "sites": [
                            {
                                "target": s.target,
                                "model_version": s.model_version,
                                "error": s.error,
                                "status": site_status(s.error, s.model_version, m.model_version),
                            }
                            for s in m.sites
                        ]
                    }
                    if m.sites
                    else {}
                ),
            }
            for m in info.modalities
        ],
    }


def site_status(error: str, site_version: str, registered: str) -> str:
    """What a site's line says: its error, or that its model version is refused (another
    version than the modality's registered one: the site is left out of answers), or ok."""
    if error:
        return error
    if not site_version:
        return "no model version yet (left out of answers)"
    if registered and site_version != registered:
        return f"refused: serves version {site_version}, not the registered {registered} (left out)"
    return "ok"


def coordinator_info(
    coordinator: CoordinatorOpt,
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 10.0,
) -> None:
    """Registered owners, model versions, K and the class prior."""
    sec = security(tls, insecure)
    import grpc

    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2

    stub = coordinator_stub(coordinator, sec)
    try:
        info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise rpc_failure(exc, coordinator, sec) from exc
    payload = info_payload(info)
    if as_json:
        print_json(payload)
        return
    table = new_table(
        f"coordinator {coordinator}: K={payload['num_classes']}, "
        f"default method {payload['default_method']}",
        ["modality", "owner", "model version", "head", "class counts", "registered"],
    )
    for m in payload["modalities"]:
        table.add_row(
            m["modality"],
            m["owner"],
            m["model_version"],
            m["head_kind"],
            " ".join(map(str, m["class_counts"])),
            m["registered_at"][:19],
        )
    console = out()
    console.print(table)
    for m in payload["modalities"]:
        for site in m.get("sites", []):
            state = site["status"]
            console.print(
                f"{m['modality']} site {site['target']}: {site['model_version'] or '-'}, {state}",
                highlight=False,
            )
    names = payload["class_names"] or [str(k) for k in range(payload["num_classes"])]
    prior = ", ".join(f"{n} {p:.3f}" for n, p in zip(names, payload["class_prior"], strict=False))
    console.print(f"class prior: {prior}", highlight=False)


def register(app: typer.Typer) -> None:
    from jacfusion_fed.cli import group

    coord = group(app, "coordinator", "The coordinator: fuse the owners' logits.")
    coord.command("serve")(coordinator_serve)
    coord.command("info")(coordinator_info)
