"""What the serving and calling commands share: ``--tls``/``--insecure``, the port check made
before any work starts, the requester's channel, and gRPC errors as one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jacfusion_fed.cli.errors import EXIT_FAILED, CliError

__all__ = [
    "bind_host",
    "check_port_free",
    "coordinator_stub",
    "coordinator_targets",
    "peer_limits",
    "rpc_failure",
    "say_metrics_url",
    "security",
    "serve_until_signal",
    "start_tracing",
]


def security(tls: Path | None, insecure: bool) -> Any:
    """``INSECURE`` or the checked :class:`~jacfusion_fed.rpc.tls.TlsFiles` of ``--tls DIR``:
    every file present and readable, the private key owner-only."""
    from jacfusion_fed.privacy import check_private_file
    from jacfusion_fed.rpc.tls import INSECURE, TlsFiles

    if insecure and tls is not None:
        raise CliError("pass either --tls DIR or --insecure, not both")
    if insecure:
        return INSECURE
    if tls is None:
        raise CliError(
            "pass --tls DIR (a directory with ca.pem, cert.pem, key.pem from "
            "`jacfusion-fed certs`) or, for local experiments only, --insecure"
        )
    if not tls.is_dir():
        raise CliError(f"--tls {tls}: no such directory")
    files = TlsFiles.from_dir(tls)
    files.read()  # FileNotFoundError / PermissionError name the file
    check_private_file(files.key)
    return files


def start_tracing(service: str, trace_file: Path | None) -> bool:
    """``--trace-file`` and the ``OTEL_*`` variables (:func:`jacfusion_fed.rpc.tracing.configure`):
    whether spans are recorded; a bad exporter setting is one line. Imports nothing of
    OpenTelemetry when neither asks for spans."""
    from jacfusion_fed.rpc import tracing

    try:
        return tracing.configure(service, trace_file)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"--trace-file {trace_file}: {exc.strerror or exc}") from None


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """Fail now (before training, loading or connecting) if ``host:port`` is taken."""
    from jacfusion_fed.rpc.tls import PortInUseError
    from jacfusion_fed.rpc.tls import check_port_free as library_check

    try:
        library_check(host, port)
    except PortInUseError as exc:
        raise CliError(f"{exc.strerror} (or pass another {option})") from None
    except OSError as exc:
        raise CliError(f"--host {host!r}: cannot use it ({exc.strerror or exc})") from None


def peer_limits(max_workers: int, metrics_port: int | None, max_streams: int | None) -> Any:
    """``--max-streams-per-peer`` as :class:`~jacfusion_fed.rpc.limits.PeerLimits` (``None``:
    the server's defaults); a ``--metrics-port`` that is taken fails now, before any work."""
    from jacfusion_fed.processes import LOOPBACK

    if metrics_port:  # 0 picks a free port, None serves no metrics
        check_port_free(LOOPBACK, metrics_port, "--metrics-port")
    if max_streams is None:
        return None
    from jacfusion_fed.rpc.limits import PeerLimits

    return PeerLimits.for_workers(max_workers, max_streams_per_peer=max_streams)


def say_metrics_url(running: Any) -> None:
    """``metrics on http://127.0.0.1:N/metrics`` on stderr when the server serves metrics."""
    from jacfusion_fed.cli.render import err

    endpoint = getattr(running.guard, "endpoint", None)
    if endpoint is not None:
        err().print(f"metrics on {endpoint.url}", highlight=False)


def serve_until_signal(running: Any, what: str, port_file: Path | None) -> None:
    """Serve until SIGTERM/SIGINT; the port file is written once the signal is handled (a
    SIGTERM right after start is a clean stop) and removed when the server stops (a stale file
    never names a port nobody serves); ``<what> stopped`` on stderr; exits in < 1 s."""
    from jacfusion_fed.rpc.serving import serve_until_signal as library_serve
    from jacfusion_fed.rpc.serving import write_port_file

    def stop(grace: float) -> None:
        running.stop(grace)
        if port_file is not None:
            port_file.unlink(missing_ok=True)

    library_serve(stop, what, ready=lambda: write_port_file(port_file, running.port))


def coordinator_targets(text: str) -> list[str]:
    """``--coordinator`` as ``HOST:PORT`` items: each ``HOST`` gets the default port."""
    from jacfusion_fed.cli.options import DEFAULT_COORDINATOR_PORT

    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise CliError(f"--coordinator {text!r}: an address is empty")
    out = []
    for item in items:
        host, sep, port = item.rpartition(":")
        bare_v6 = item.count(":") > 1 and not item.startswith("[")
        if not sep or bare_v6 or (host.startswith("[") and not host.endswith("]")):
            out.append(
                f"[{item}]:{DEFAULT_COORDINATOR_PORT}"
                if bare_v6
                else f"{item}:{DEFAULT_COORDINATOR_PORT}"
            )
        elif not port.isdigit():
            raise CliError(f"--coordinator must be HOST[:PORT], got {item!r}")
        else:
            out.append(item)
    return out


def coordinator_stub(target: str, sec: Any) -> Any:
    """A ``FusionService`` stub for a requester over one channel to every replica named in
    ``--coordinator`` (the coordinator's name is checked with TLS).

    Imports only gRPC and the generated code: ``predict`` must start fast.
    """
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2_grpc

    try:
        channel = connect_coordinator(coordinator_targets(target), sec)
    except ValueError as exc:
        raise CliError(f"--coordinator: {exc}") from None
    return fusion_pb2_grpc.FusionServiceStub(channel)


def bind_host(host: str, what: str) -> str:
    """``--host`` checked before any work starts (one line if it is not an address); the
    not-loopback warning comes once, when the server binds."""
    from jacfusion_fed.rpc.bind import check_bind_host

    try:
        return check_bind_host(host, what=what, warn=lambda _message: None)
    except ValueError as exc:
        raise CliError(f"--host: {exc}") from None


def rpc_failure(exc: Any, target: str, sec: Any) -> CliError:
    """A failed call as one line (with its status details: field violations, retry delay);
    for ``UNAVAILABLE`` with the likely cause checked locally
    (:func:`jacfusion_fed.rpc.diagnose.likely_cause`, for each address of ``--coordinator``
    until one names a cause)."""
    from jacfusion_fed.rpc.diagnose import likely_cause
    from jacfusion_fed.rpc.status_details import with_details

    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    message = with_details(f"{code}: {details}", exc)  # field violations, retry delay
    if code == "UNAVAILABLE":
        for address in coordinator_targets(target):
            cause = likely_cause(address, sec, expected_role="coordinator", own_role="requester")
            if cause:
                return CliError(
                    f"{code}: cannot call the coordinator at {address}: {cause}",
                    exit_code=EXIT_FAILED,
                )
    return CliError(message, exit_code=EXIT_FAILED)
