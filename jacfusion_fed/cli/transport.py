"""What the serving and calling commands share: ``--tls``/``--insecure``, the port check made
before any work starts, the requester's channel, and gRPC errors as one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jacfusion_fed.cli.errors import EXIT_FAILED, CliError

__all__ = [
    "check_port_free",
    "coordinator_stub",
    "rpc_failure",
    "security",
    "serve_until_signal",
]


def security(tls: Path | None, insecure: bool) -> Any:
    """``INSECURE`` or the checked :class:`~jacfusion_fed.rpc.tls.TlsFiles` of ``--tls DIR``:
    every file present and readable, the private key owner-only."""
    from jacfusion_fed.privacy._fileio import check_private_file
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


def check_port_free(host: str, port: int) -> None:
    """Fail now (before training, loading or connecting) if ``host:port`` is taken."""
    from jacfusion_fed.rpc.tls import PortInUseError
    from jacfusion_fed.rpc.tls import check_port_free as library_check

    try:
        library_check(host, port)
    except PortInUseError as exc:
        raise CliError(f"{exc.strerror} (or pass another --port)") from None
    except OSError as exc:
        raise CliError(f"--host {host!r}: cannot use it ({exc.strerror or exc})") from None


def serve_until_signal(running: Any, what: str, port_file: Path | None) -> None:
    """Serve until SIGTERM/SIGINT; the port file is written once the signal is handled (a
    SIGTERM right after start is a clean stop); ``<what> stopped`` on stderr; exits in < 1 s."""
    from jacfusion_fed.rpc.server import serve_until_signal as library_serve
    from jacfusion_fed.rpc.server import write_port_file

    library_serve(running.stop, what, ready=lambda: write_port_file(port_file, running.port))


def coordinator_stub(target: str, sec: Any) -> Any:
    """A ``FusionService`` stub for a requester (the coordinator's name is checked with TLS).

    Imports only gRPC and the generated code: ``predict`` must start fast.
    """
    from jacfusion_fed.privacy.certs import COORDINATOR_SERVER_NAME
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2_grpc
    from jacfusion_fed.rpc.tls import Insecure, create_channel

    if ":" not in target or not target.rpartition(":")[2].isdigit():
        raise CliError(f"--coordinator must be HOST:PORT, got {target!r}")
    name = None if isinstance(sec, Insecure) else COORDINATOR_SERVER_NAME
    channel = create_channel(target, sec, server_name=name)
    return fusion_pb2_grpc.FusionServiceStub(channel)


def rpc_failure(exc: Any, target: str, sec: Any) -> CliError:
    """A failed call as one line; for ``UNAVAILABLE`` with the likely cause checked locally."""
    from jacfusion_fed.cli.tlshints import likely_cause

    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    message = f"{code}: {details}"
    if code == "UNAVAILABLE":
        cause = likely_cause(target, sec)
        if cause:
            message = f"{code}: cannot call the coordinator at {target}: {cause}"
    return CliError(message, exit_code=EXIT_FAILED)
