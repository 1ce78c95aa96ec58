"""``jacfusion-fed owner serve``: a modality owner's ModalityService (head, logits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    TraceFileOpt,
)
from jacfusion_fed.cli.render import err
from jacfusion_fed.cli.transport import (
    bind_host,
    check_port_free,
    peer_limits,
    say_metrics_url,
    security,
    serve_until_signal,
    start_tracing,
)

__all__ = ["owner_serve", "register"]


def owner_serve(
    workspace: Annotated[Path, typer.Option(help="The owner's workspace directory (model store).")],
    modality: Annotated[str, typer.Option(help="The modality this owner serves.")],
    pseudonym_key: Annotated[Path, typer.Option(help="The deployment's HMAC pseudonym key.")],
    data: Annotated[
        str | None,
        typer.Option(
            help="Data source (builtin:avdigits?quick=1, npz:FILE); without it the owner "
            "answers only for records requesters send (submit).",
            show_default=False,
        ),
    ] = None,
    retention: Annotated[
        float | None,
        typer.Option(
            help="Seconds a submitted record is kept (default: until forgotten).",
            min=1,
            show_default=False,
        ),
    ] = None,
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
        bool,
        typer.Option(
            help="Train a model first when the workspace has none (the simulation's recipe; "
            "prints each split's accuracy)."
        ),
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs for --train-if-missing (default: the simulation's recipe).",
            min=1,
            show_default=False,
        ),
    ] = None,
    input_test: Annotated[
        bool,
        typer.Option(
            help="Also publish the attack-free input test in each p-value (image-like records; "
            "fitted once on the training records, kept in the workspace).",
        ),
    ] = False,
    max_workers: Annotated[int, typer.Option(help="Handler threads.", min=1)] = 8,
    max_streams_per_peer: MaxStreamsPerPeerOpt = None,
    metrics_port: MetricsPortOpt = None,
    audit_log: AuditLogOpt = None,
    audit_rotate: AuditRotateOpt = "64MiB",
    audit_fsync: AuditFsyncOpt = "entry",
    trace_file: TraceFileOpt = None,
) -> None:
    """Serve this owner's ModalityService (head, logits) to the coordinator until SIGTERM."""
    sec = security(tls, insecure)
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.rpc.auth import check_own_certificate
    from jacfusion_fed.rpc.tls import TlsFiles

    owner_cn = name or f"{modality}-owner"
    if isinstance(sec, TlsFiles):  # never serve under another role's or modality's certificate
        owner_cn = check_own_certificate(sec, "owner", modality).name
    if train_if_missing and data is None:
        raise CliError("--train-if-missing needs --data (the records to train on)")
    if input_test and data is None:
        raise CliError("--input-test needs --data (the records it is fitted on)")
    pseudonymizer = Pseudonymizer.from_file(pseudonym_key)
    host = bind_host(host, "owner ModalityService")
    check_port_free(host, port)  # before training: a taken port must not cost a training run
    limits = peer_limits(max_workers, metrics_port, max_streams_per_peer)
    start_tracing("jacfusion-owner", trace_file)

    from jacfusion_fed.clients.serve import serve_owner
    from jacfusion_fed.owner import DataSource, OwnerWorkspace
    from jacfusion_fed.owner.startup import check_can_serve

    try:
        source = None if data is None else DataSource.parse(data)
    except ValueError as exc:
        raise CliError(f"--data: {exc}") from None
    ws = OwnerWorkspace(
        workspace,
        modality,
        source,
        pseudonymizer,
        allow_full_head=allow_full_head,
        retention_s=retention,
    )
    version = check_can_serve(ws)  # a bad data source or model: one line now, not per call
    if input_test:  # before training: it depends on the records only, and can fail on them
        _fit_input_test(ws)
    if train_if_missing and version is None:
        _train(ws, epochs)
    elif version is None:
        err().print(f"no model yet: {modality!r} is NOT_SERVING until `owner import-model`")
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


def _fit_input_test(ws: Any) -> None:
    """``--input-test``: fit it now unless the workspace holds one fitted on these records."""
    from jacfusion_fed.owner.detector import INPUT_TEST_FILE

    def fitting(n: int) -> None:
        err().print(f"fitting the input test for {ws.modality!r} on {n} training records ...")

    try:
        fitted, seconds = ws.fit_input_test(fitting)
    except ValueError as exc:
        raise CliError(f"--input-test: {exc}") from None
    where = ws.root / INPUT_TEST_FILE
    how = "fitted on these records, reused from"
    if fitted:
        how = f"fitted in {seconds:.0f} s, kept in"
    err().print(f"input test for {ws.modality!r}: {how} {where}", highlight=False)


def _train(ws: Any, epochs: int | None) -> None:
    """``--train-if-missing``: the simulation's recipe, then each split's accuracy."""
    from jacfusion_fed.owner.recipe import recipe_for, train_recommended

    recipe = recipe_for(ws)
    err().print(
        f"training a {ws.modality!r} model ({epochs or recipe.epochs} epochs, lr {recipe.lr:g}, "
        f"batch {recipe.batch_size}: the simulation's recipe) ...",
        highlight=False,
    )
    metrics = train_recommended(ws, epochs=epochs)
    splits = [k.removesuffix("_accuracy") for k in metrics if k.endswith("_accuracy")]
    shown = [s for s in ("train", "val", "test") if s in splits]
    err().print(
        f"{ws.modality} accuracy: "
        + ", ".join(f"{s} {100 * metrics[f'{s}_accuracy']:.1f} %" for s in shown),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    from jacfusion_fed.cli import group

    group(app, "owner", "A modality owner: serve its head and logits.").command("serve")(
        owner_serve
    )
