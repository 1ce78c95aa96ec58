"""Online inference: ``owner serve``, ``coordinator serve``, ``coordinator info``, ``predict``
and ``bench serve``.

Transport is mTLS unless ``--insecure`` is given explicitly (then only loopback addresses).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from jacfusion_fed.cli.bench import bench_app

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

_METHODS = ("statistical", "jacobian", "mean", "confidence_mean")


def _group(app: typer.Typer, name: str, help_text: str) -> typer.Typer:
    """The sub-command group ``name`` of ``app``, created unless another module did."""
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


def _security(tls: Path | None, insecure: bool) -> Any:
    from jacfusion_fed.rpc.tls import INSECURE, TlsFiles

    if insecure and tls is not None:
        raise typer.BadParameter("pass either --tls DIR or --insecure, not both")
    if insecure:
        return INSECURE
    if tls is None:
        raise typer.BadParameter(
            "pass --tls DIR (a directory with ca.pem, cert.pem, key.pem from "
            "`jacfusion-fed certs`) or, for local experiments only, --insecure"
        )
    files = TlsFiles.from_dir(tls)
    try:
        files.read()
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return files


def _write_port_file(path: Path | None, port: int) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve_until_signal(stop_server: Any) -> None:
    done = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
    stop_server()


TlsOpt = Annotated[
    Path | None, typer.Option("--tls", help="Certificate directory (ca.pem, cert.pem, key.pem).")
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Plain text on loopback, no authentication.")
]
HostOpt = Annotated[str, typer.Option(help="Address to bind (default loopback only).")]
PortOpt = Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.", min=0)]
PortFileOpt = Annotated[
    Path | None, typer.Option(help="Write the bound port to this file once serving.")
]
LogOpt = Annotated[str, typer.Option(help="Log level.")]


# --- owner ------------------------------------------------------------------------------------


def owner_serve(
    workspace: Annotated[Path, typer.Option(help="The owner's workspace directory (model store).")],
    modality: Annotated[str, typer.Option(help="The modality this owner serves.")],
    pseudonym_key: Annotated[Path, typer.Option(help="The deployment's HMAC pseudonym key.")],
    data: Annotated[str | None, typer.Option(help="Data source; none: records only.")] = None,
    retention: Annotated[float | None, typer.Option(help="Seconds records are kept.")] = None,
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    name: Annotated[str | None, typer.Option(help="Owner name (default: certificate CN).")] = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 0,
    port_file: PortFileOpt = None,
    allow_full_head: Annotated[bool, typer.Option(help="Also share W and b.")] = False,
    logit_cache: Annotated[
        bool, typer.Option(help="Answer from the per-version logit cache (off: benchmarks).")
    ] = True,
    train_if_missing: Annotated[
        bool, typer.Option(help="Train a model first when the workspace has none.")
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: recipe).", min=1)] = None,
    max_workers: Annotated[int, typer.Option(help="Handler threads.", min=1)] = 8,
    log_level: LogOpt = "info",
) -> None:
    """Serve this owner's ModalityService (head, logits) to the coordinator until SIGTERM."""
    _logging(log_level)
    security = _security(tls, insecure)
    from jacfusion_fed.clients.serve import serve_owner
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.rpc.auth import check_own_certificate
    from jacfusion_fed.rpc.tls import TlsFiles

    if isinstance(security, TlsFiles):
        try:  # before touching the workspace: never serve under another modality's certificate
            check_own_certificate(security, "owner", modality)
        except ValueError as exc:
            err_console.print(f"error: {exc}")
            raise typer.Exit(2) from exc

    ws = OwnerWorkspace(
        workspace, modality, data, Pseudonymizer.from_file(pseudonym_key),
        allow_full_head=allow_full_head, retention_s=retention,
    )  # fmt: skip
    if train_if_missing and ws.store.current_version() is None:
        from jacfusion_fed.owner.recipe import train_recommended

        err_console.print(f"training a {modality!r} model (the simulation's recipe) ...")
        metrics = train_recommended(ws, epochs=epochs)
        err_console.print(", ".join(f"{k} {v:.1%}" for k, v in metrics.items() if "acc" in k))
    try:
        running = serve_owner(
            ws, security, owner_name=name, host=host, port=port, max_workers=max_workers,
            use_logit_cache=logit_cache,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        err_console.print(f"error: {exc}")
        raise typer.Exit(2) from exc
    _write_port_file(port_file, running.port)
    err_console.print(
        f"owner {running.servicer.owner_name!r} serving {modality!r} on {running.target}"
    )
    _serve_until_signal(running.stop)


# --- coordinator ------------------------------------------------------------------------------


def coordinator_serve(
    registry: Annotated[Path, typer.Option(help="Head registry directory (persists heads).")],
    owner: Annotated[list[str], typer.Option(help="MODALITY=HOST:PORT of an owner (repeat).")],
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 0,
    port_file: PortFileOpt = None,
    method: Annotated[
        str, typer.Option(help=f"Default method: {', '.join(_METHODS)}.")
    ] = "jacobian",
    gamma: Annotated[float, typer.Option(help="Default gamma in (0, 1].")] = 0.5,
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
    log_level: LogOpt = "info",
) -> None:
    """Serve FusionService (Predict, PredictStream, GetModelInfo) until SIGTERM."""
    _logging(log_level)
    security = _security(tls, insecure)
    from jacfusion_fed.server.coordinator import Coordinator
    from jacfusion_fed.server.predict_types import CoordinatorConfig, OwnerEndpoint
    from jacfusion_fed.server.serve import serve_coordinator
    from jacfusion_fed.store import CorruptFileError

    try:
        endpoints = [OwnerEndpoint.parse(o) for o in owner]
        config = CoordinatorConfig(
            default_method=method, default_gamma=gamma, default_iterations=iterations,
            max_iterations=max(16, iterations), owner_timeout_s=owner_timeout,
            max_batch=max_batch, device=device, batch_fusion=fusion_batching,
        )  # fmt: skip
        coordinator = Coordinator(registry, endpoints, security, config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except CorruptFileError as exc:  # refuse to start on a damaged registry, never use it
        err_console.print(
            f"error: the head registry is damaged, refusing to start: {exc}\n"
            "Move the damaged entry away (the previous entry of that modality becomes current "
            "and the owner's current head is fetched again), then restart."
        )
        raise typer.Exit(2) from exc
    try:
        running = serve_coordinator(
            coordinator, security, host=host, port=port, max_workers=max_workers
        )
    except (ValueError, OSError) as exc:
        err_console.print(f"error: {exc}")
        raise typer.Exit(2) from exc
    _write_port_file(port_file, running.port)
    err_console.print(
        f"coordinator serving on {running.target} (fusion on {coordinator.device}); owners: "
        + ", ".join(f"{e.modality}={e.target}" for e in endpoints)
    )
    _serve_until_signal(running.stop)


CoordOpt = Annotated[str, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")]


def _stub(target: str, security: Any) -> Any:
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2_grpc
    from jacfusion_fed.server.serve import connect_coordinator

    return fusion_pb2_grpc.FusionServiceStub(connect_coordinator(target, security))


def _rpc_error(exc: Any) -> typer.Exit:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    err_console.print(f"error: {code}: {details}")
    return typer.Exit(1)


def coordinator_info(
    coordinator: CoordOpt,
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Call deadline (s).")] = 10.0,
) -> None:
    """Registered owners, model versions, K and the class prior."""
    import grpc

    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2

    stub = _stub(coordinator, _security(tls, insecure))
    try:
        info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    mods = [
        {
            "modality": m.modality, "owner": m.owner, "model_version": m.model_version,
            "num_classes": m.num_classes, "class_counts": list(m.class_counts),
            "head_kind": modality_pb2.HeadKind.Name(m.head_kind),
            "registered_at": m.registered_at.ToDatetime().isoformat() + "Z",
        }
        for m in info.modalities
    ]  # fmt: skip
    payload = {
        "num_classes": info.num_classes,
        "class_prior": list(info.class_prior),
        "class_names": list(info.class_names),
        "default_method": fusion_pb2.FusionMethod.Name(info.default_method),
        "modalities": mods,
    }
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    table = Table(title=f"coordinator {coordinator}: K={info.num_classes}")
    for col in ("modality", "owner", "model version", "class counts", "registered"):
        table.add_column(col)
    for m in mods:
        table.add_row(
            m["modality"], m["owner"], m["model_version"],
            " ".join(map(str, m["class_counts"])), m["registered_at"][:19],
        )  # fmt: skip
    console.print(table)
    console.print("class prior: " + " ".join(f"{p:.3f}" for p in info.class_prior))


# --- predict ----------------------------------------------------------------------------------


def _parse_gammas(items: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"--gamma must look like MODALITY=VALUE, got {item!r}")
    return out


def predict(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Sample ids (local ids with --pseudonym-key).")
    ] = None,
    coordinator: CoordOpt = "127.0.0.1:50050",
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    ids_file: Annotated[Path | None, typer.Option(help="File with one id per line.")] = None,
    pseudonym_key: Annotated[
        Path | None, typer.Option(help="Pseudonymize the given local ids with this key first.")
    ] = None,
    pseudonyms: Annotated[
        bool, typer.Option("--pseudonyms", help="The given ids already are pseudonyms.")
    ] = False,
    method: Annotated[str | None, typer.Option(help=f"{', '.join(_METHODS)}.")] = None,
    gamma: Annotated[list[str] | None, typer.Option(help="MODALITY=GAMMA (repeat).")] = None,
    default_gamma: Annotated[float | None, typer.Option(help="Gamma for the others.")] = None,
    regularize: Annotated[
        list[str] | None, typer.Option(help="Modality to regularize (repeat).")
    ] = None,
    iterations: Annotated[int | None, typer.Option(help="Solver iterations.", min=1)] = None,
    modality: Annotated[list[str] | None, typer.Option(help="Use only these (repeat).")] = None,
    require_all: Annotated[bool, typer.Option(help="Fail unless every owner answers.")] = False,
    skip_unknown: Annotated[
        bool, typer.Option(help="Predict the known ids, list the rest.")
    ] = False,
    owner_timeout: Annotated[float | None, typer.Option(help="Per-owner timeout (s).")] = None,
    stream: Annotated[bool, typer.Option(help="Use PredictStream (large batches).")] = False,
    chunk_size: Annotated[int, typer.Option(help="Ids per streamed response (0: default).")] = 0,
    timeout: Annotated[float, typer.Option(help="Call deadline (s).")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    labels: Annotated[Path | None, typer.Option(help="Labels file: print accuracy.")] = None,
) -> None:
    """Fused predictions for a batch of samples, as a table or JSON."""
    import grpc
    import numpy as np

    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2
    from jacfusion_fed.server.fusion_service import decode_predictions, options_to_proto
    from jacfusion_fed.server.predict_types import PredictOptions

    given = list(ids or [])
    if ids_file is not None:
        given += [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if not given:
        raise typer.BadParameter("no sample ids given (arguments or --ids-file)")
    if (pseudonym_key is None) == (not pseudonyms):
        raise typer.BadParameter(
            "pass --pseudonym-key KEY to pseudonymize local patient ids before sending them, or "
            "--pseudonyms if the ids already are pseudonyms (raw patient ids are never sent)"
        )
    local: dict[str, str] = {}
    if pseudonym_key is not None:
        from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

        pz = Pseudonymizer.from_file(pseudonym_key)
        sent = [pz(i) for i in given]
        local = dict(zip(sent, given, strict=True))
    else:
        sent = given
    if method is not None and method not in _METHODS:
        raise typer.BadParameter(f"--method must be one of {', '.join(_METHODS)}")
    opts = options_to_proto(
        PredictOptions(
            method=method, default_gamma=default_gamma, gammas=_parse_gammas(gamma),
            regularize=tuple(regularize or ()), iterations=iterations,
            require_all=require_all, modalities=tuple(modality or ()),
            owner_timeout_s=owner_timeout, skip_unknown_ids=skip_unknown,
        )
    )  # fmt: skip
    stub = _stub(coordinator, _security(tls, insecure))
    try:
        if stream:
            chunks = [
                decode_predictions(r.predictions)
                for r in stub.PredictStream(
                    fusion_pb2.PredictStreamRequest(
                        sample_ids=sent, options=opts, chunk_size=chunk_size
                    ),
                    timeout=timeout,
                )
            ]
            result = chunks[0]
            for extra in chunks[1:]:
                result.sample_ids += extra.sample_ids
                result.probabilities = np.concatenate([result.probabilities, extra.probabilities])
                result.labels = np.concatenate([result.labels, extra.labels])
                result.unpredicted_sample_ids += extra.unpredicted_sample_ids
                for c, e in zip(result.modalities, extra.modalities, strict=True):
                    c.used = np.concatenate([c.used, e.used])
                    c.error = c.error or e.error
        else:
            resp = stub.Predict(
                fusion_pb2.PredictRequest(sample_ids=sent, options=opts), timeout=timeout
            )
            result = decode_predictions(resp.predictions)
        names: list[str] = []
        if not as_json:
            info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=timeout)
            names = list(info.class_names)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    if labels is not None:  # to stderr: --json output stays one JSON document
        from jacfusion_fed.cli.records import print_accuracy

        print_accuracy(result.sample_ids, result.labels, local, labels, err_console)
    if as_json:
        print(json.dumps(result.to_json(local or None), indent=2))
        return
    table = Table(title=f"fused predictions ({result.method})")
    table.add_column("local id" if local else "sample id")
    table.add_column("label", justify="right")
    table.add_column("p(label)", justify="right")
    table.add_column("modalities used")
    for i, sid in enumerate(result.sample_ids):
        label = int(result.labels[i])
        table.add_row(
            local.get(sid, sid if local else sid[:16] + ("..." if len(sid) > 16 else "")),
            names[label] if label < len(names) else str(label),
            f"{result.probabilities[i, label]:.4f}",
            ", ".join(c.modality for c in result.modalities if c.used[i]),
        )
    console.print(table)
    mods = Table(title="modalities")
    for col in ("modality", "owner", "model version", "samples", "gamma", "error"):
        mods.add_column(col)
    for c in result.modalities:
        shown_gamma = f"{c.gamma:g}{' (reg.)' if c.regularized else ''}"
        mods.add_row(
            c.modality, c.owner, c.model_version, str(int(c.used.sum())),
            shown_gamma if result.method == "jacobian" else "", c.error,
        )  # fmt: skip
    console.print(mods)
    if result.unpredicted_sample_ids:
        console.print(
            "not predicted: " + ", ".join(local.get(s, s) for s in result.unpredicted_sample_ids)
        )


# --- bench ------------------------------------------------------------------------------------


@bench_app.command("serve")
def bench_serve(
    samples: Annotated[
        int, typer.Option(help="Records per owner (distinct ids).", min=1024)
    ] = 4096,
    classes: Annotated[int, typer.Option(help="K.", min=2)] = 10,
    batch: Annotated[int, typer.Option(help="Batch size for the throughput run.", min=1)] = 1024,
    latency_requests: Annotated[
        int, typer.Option(help="Single-sample requests timed.", min=10)
    ] = 2000,
    duration: Annotated[float, typer.Option(help="Seconds per throughput run.")] = 8.0,
    clients: Annotated[int, typer.Option(help="Concurrent requester threads.", min=1)] = 2,
    method: Annotated[str, typer.Option(help="Fusion method timed.")] = "jacobian",
    uncached: Annotated[
        bool, typer.Option(help="Also run with the owners' logit cache off.")
    ] = True,
    workdir: Annotated[Path | None, typer.Option(help="Keep the run's files here.")] = None,
    out: Annotated[Path, typer.Option(help="JSON results.")] = Path("bench-serve.json"),
) -> None:
    """Predict latency against a bare gRPC echo (same run, same TLS settings) and throughput."""
    from jacfusion_fed.bench.serve import ServeBenchConfig, print_results, run_serve_bench

    if method not in _METHODS:
        raise typer.BadParameter(f"--method must be one of {', '.join(_METHODS)}")
    config = ServeBenchConfig(
        samples=samples, classes=classes, batch=batch, latency_requests=latency_requests,
        duration_s=duration, clients=clients, method=method, uncached=uncached,
    )  # fmt: skip
    results = run_serve_bench(config, workdir=workdir, progress=lambda m: err_console.log(m))
    print_results(results, console)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    owner_group = _group(app, "owner", "A modality owner: serve its head and logits.")
    owner_group.command("serve")(owner_serve)
    coord_group = _group(app, "coordinator", "The coordinator: fuse the owners' logits.")
    coord_group.command("serve")(coordinator_serve)
    coord_group.command("info")(coordinator_info)
    app.command("predict")(predict)
