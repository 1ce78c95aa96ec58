"""What the serving and calling commands share: ``--tls``/``--insecure``, the port check made
before any work starts, the requester's channel, and gRPC errors as one line."""

from __future__ import annotations

import errno
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from jacfusion_fed.cli.errors import EXIT_FAILED, CliError

__all__ = [
    "check_port_free",
    "coordinator_stub",
    "rpc_failure",
    "security",
    "serve_until_signal",
    "write_port_file",
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
    """Fail now (before training, loading or connecting) if ``host:port`` cannot be bound."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CliError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(
                    f"port {port} on {host} is in use (stop the process using it, or pass "
                    "another --port)"
                ) from None
            raise CliError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None


def write_port_file(path: Path | None, port: int) -> None:
    """Write the bound port (for scripts that started the server with ``--port 0``)."""
    if path is None:
        return
    from jacfusion_fed.atomicio import atomic_write_bytes

    atomic_write_bytes(path, f"{port}\n".encode())


def serve_until_signal(stop_server: Any) -> str:
    """Block until SIGTERM/SIGINT, then stop the server; returns the signal's name."""
    done = threading.Event()
    got: list[str] = []

    def handle(signum: int, _frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
    stop_server()
    return got[0] if got else "signal"


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
