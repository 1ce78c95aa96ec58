"""``jacfusion-fed owner serve``: a modality owner's ModalityService (head, logits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jacfusion_fed.cli.audit import open_audit_log
from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.options import (
    DEFAULT_OWNER_PORT,
    AuditFsyncOpt,
    AuditLogOpt,
    AuditRotateOpt,
    HostOpt,
    InsecureOpt,
    MaxStreamsPerPeerOpt,
    MetricsPortOpt,
    PortFileOpt,
    TlsOpt,
)
from jacfusion_fed.cli.render import err
from jacfusion_fed.cli.transport import (
    bind_host,
    check_port_free,
    peer_limits,
    say_metrics_url,
    security,
    serve_until_signal,
)

__all__ = ["owner_serve", "register"]


def owner_serve(
    workspace: Annotated[Path, typer.Option(help="The owner's workspace directory (model store).")],
    modality: Annotated[str, typer.Option(help="The modality this owner serves.")],
    data: Annotated[str, typer.Option(help="Data source, e.g. builtin:avdigits or npz:FILE.")],
    pseudonym_key: Annotated[Path, typer.Option(help="The deployment's HMAC pseudonym key.")],
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    name: Annotated[str | None, typer.Option(help="Owner name (default: certificate CN).")] = None,
    host: HostOpt = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to bind; 0 picks a free one (see --port-file).", min=0)
    ] = DEFAULT_OWNER_PORT,
    port_file: PortFileOpt = None,
    allow_full_head: Annotated[bool, typer.Option(help="Also share W and b.")] = False,
    logit_cache: Annotated[
        bool, typer.Option(help="Answer from the per-version logit cache (off: benchmarks).")
    ] = True,
    train_if_missing: Annotated[
        bool, typer.Option(help="Train a model first when the workspace has none.")
    ] = False,
    epochs: Annotated[int, typer.Option(help="Epochs for --train-if-missing.", min=1)] = 8,
    max_workers: Annotated[int, typer.Option(help="Handler threads.", min=1)] = 8,
    max_streams_per_peer: MaxStreamsPerPeerOpt = None,
    metrics_port: MetricsPortOpt = None,
    audit_log: AuditLogOpt = None,
    audit_rotate: AuditRotateOpt = "64MiB",
    audit_fsync: AuditFsyncOpt = "entry",
) -> None:
    """Serve this owner's ModalityService (head, logits) to the coordinator until SIGTERM."""
    sec = security(tls, insecure)
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.rpc.auth import check_own_certificate
    from jacfusion_fed.rpc.tls import TlsFiles

    owner_cn = name or f"{modality}-owner"
    if isinstance(sec, TlsFiles):  # never serve under another role's or modality's certificate
        owner_cn = check_own_certificate(sec, "owner", modality).name
    pseudonymizer = Pseudonymizer.from_file(pseudonym_key)
    host = bind_host(host, "owner ModalityService")
    check_port_free(host, port)  # before training: a taken port must not cost a training run
    limits = peer_limits(max_workers, metrics_port, max_streams_per_peer)

    from jacfusion_fed.clients.serve import serve_owner
    from jacfusion_fed.owner import OwnerWorkspace

    ws = OwnerWorkspace(workspace, modality, data, pseudonymizer, allow_full_head=allow_full_head)
    if train_if_missing and ws.store.current_version() is None:
        err().print(f"training a {modality!r} model ({epochs} epochs) ...")
        ws.train(epochs=epochs)
    from jacfusion_fed.audit import service_identity

    service = service_identity("owner", owner_cn, modality)
    audit = open_audit_log(audit_log, audit_rotate, sec, service, fsync=audit_fsync)
    try:
        running = serve_owner(
            ws,
            sec,
            owner_name=name,
            host=host,
            port=port,
            max_workers=max_workers,
            use_logit_cache=logit_cache,
            metrics_port=metrics_port,
            limits=limits,
            audit=audit,
        )
    except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
        raise CliError(f"cannot serve on {host}:{port}: {exc}") from exc
    owner = running.servicer.owner_name
    err().print(f"owner {owner!r} serving {modality!r} on {running.target}")
    say_metrics_url(running)
    serve_until_signal(running, f"owner {owner!r}", port_file)


def register(app: typer.Typer) -> None:
    from jacfusion_fed.cli import group

    group(app, "owner", "A modality owner: serve its head and logits.").command("serve")(
        owner_serve
    )
