"""Starting and stopping a gRPC service the same way everywhere (owner and coordinator).

:func:`start_server` does what every service of the project needs, in one place:

1. the transport: :class:`~jacfusion_fed.rpc.tls.TlsFiles` (mTLS) or, explicitly,
   :data:`~jacfusion_fed.rpc.tls.INSECURE` (loopback only), with the shared message-size and
   keepalive settings of :func:`~jacfusion_fed.rpc.tls.create_server`;
2. the :class:`~jacfusion_fed.rpc.auth.AuthInterceptor` with the service's policy (plus any
   further interceptors), after the tracing interceptor (:mod:`~jacfusion_fed.rpc.tracing`,
   a no-op while tracing is off) and the guard;
3. health (``grpc.health.v1``: ``""`` and every service name, ``SERVING`` or
   ``NOT_SERVING``) and reflection v1 and v1alpha (:mod:`~jacfusion_fed.rpc.reflection`);
4. the bind: an explicit ``host`` (default 127.0.0.1); a wildcard such as ``0.0.0.0`` is
   accepted with a one-line warning that it is not loopback; a port taken by another process
   raises :class:`~jacfusion_fed.rpc.tls.PortInUseError` saying so.

:meth:`RunningServer.stop` is the graceful stop (health goes ``NOT_SERVING`` first, in-flight
calls get ``grace`` seconds). :func:`serve_until_signal` is the main loop of a service process:
it waits for SIGTERM or SIGINT, stops within ``grace`` seconds, prints one line
(``owner stopped (SIGTERM, 0.01 s)``) and leaves the process at once, without the
interpreter's slow teardown of torch (measured 0.6 to 1.5 s on a loaded machine).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.privacy.cert_names import Role

from . import tracing
from .auth import AuthInterceptor, RpcPolicy, check_own_certificate
from .bind import check_bind_host
from .guard import ServerGuard
from .identity import Principal
from .reflection import enable_reflection
from .tls import (
    DEFAULT_HOST,
    Insecure,
    Security,
    TlsFiles,
    TransportOptions,
    create_server,
    is_wildcard,
)

__all__ = [
    "RunningServer",
    "ServiceHandle",
    "own_identity",
    "serve_until_signal",
    "start_server",
    "write_port_file",
]

log = logging.getLogger(__name__)


def own_identity(
    security: Security | str | Path, role: Role, modality: str | None = None
) -> tuple[Security, Principal | None]:
    """The transport and, with TLS, our own checked identity (``None`` on INSECURE).

    A certificate directory becomes :class:`TlsFiles`; its certificate must be of ``role``
    (and ``modality``), else ``ValueError`` naming the mismatch.
    """
    if isinstance(security, Insecure):
        return security, None
    tls = security if isinstance(security, TlsFiles) else TlsFiles.from_dir(security)
    return tls, check_own_certificate(tls, role, modality)


@dataclass
class RunningServer:
    """A started gRPC server with its health service."""

    server: grpc.Server
    port: int
    host: str
    health: health.HealthServicer
    services: tuple[str, ...]
    guard: ServerGuard | None = None
    _on_stop: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        """Health of ``""`` and of every service: ``SERVING`` or ``NOT_SERVING``."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            self.health.set(name, status)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after the server has stopped (e.g. close client channels)."""
        self._on_stop.append(callback)

    def stop(self, grace: float | None = 1.0) -> None:
        """Health ``NOT_SERVING``, refuse new calls, give in-flight ones ``grace`` s."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for callback in self._on_stop:
            callback()

    def wait(self) -> None:
        self.server.wait_for_termination()


@dataclass
class ServiceHandle:
    """Base of a started service (owner, coordinator): the server's address and stop."""

    rpc: RunningServer

    @property
    def server(self) -> grpc.Server:
        return self.rpc.server

    @property
    def port(self) -> int:
        return self.rpc.port

    @property
    def host(self) -> str:
        return self.rpc.host

    @property
    def health(self) -> health.HealthServicer:
        return self.rpc.health

    @property
    def guard(self) -> ServerGuard | None:
        return self.rpc.guard

    @property
    def target(self) -> str:
        return self.rpc.target

    def stop(self, grace: float | None = 1.0) -> None:
        self.rpc.stop(grace)

    def wait(self) -> None:
        self.rpc.wait()


def start_server(
    security: Security,
    *,
    policy: RpcPolicy,
    insecure_principal: Principal,
    services: Sequence[str],
    add_servicers: Callable[[grpc.Server], None],
    serving: bool,
    host: str = DEFAULT_HOST,
    port: int = 0,
    max_workers: int = 8,
    options: TransportOptions | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    guard: ServerGuard | None = None,
) -> RunningServer:
    """Create, configure and start a server (see the module docstring).

    Args:
        security: :class:`TlsFiles` (see :func:`own_identity`) or INSECURE.
        policy: the access rules of the server's methods.
        insecure_principal: the identity every caller gets on INSECURE.
        services: full names of the served services (health and reflection).
        add_servicers: registers the servicers on the (not yet started) server.
        serving: the initial health.
        host, port: address to bind (port 0 picks a free one: see ``.port``).
        max_workers: handler threads.
        options: message-size and keepalive settings.
        interceptors: run after the auth interceptor.
        guard: per-peer limits, stalled-stream cancellation and metrics
            (:class:`~jacfusion_fed.rpc.guard.ServerGuard`): its interceptor runs first, its
            pool and transport options replace ``max_workers`` and ``options``, and it is
            closed when the server stops.

    Raises:
        PortInUseError: ``port`` is taken (an ``OSError``).
        OSError: the address cannot be bound for another reason.
        ValueError: INSECURE on a non-loopback address.
    """
    auth = AuthInterceptor(
        policy, insecure_principal=insecure_principal if isinstance(security, Insecure) else None
    )
    # Tracing first (refused calls are traced too; a no-op while tracing is off).
    first: list[grpc.ServerInterceptor] = [tracing.TracingInterceptor()]
    if guard is not None:
        max_workers, options = guard.pool, guard.options
        first.append(guard.interceptor)
    server, bound = create_server(
        security,
        host=host,
        port=port,
        max_workers=max_workers,
        interceptors=[*first, auth, *interceptors],
        options=options,
        allow_all_interfaces=is_wildcard(host),
    )
    check_bind_host(host, what=services[0] if services else "gRPC server")
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    running = RunningServer(server, bound, host, health_servicer, tuple(services), guard)
    if guard is not None:
        running.on_stop(guard.close)
    running.set_serving(serving)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*services, health.SERVICE_NAME), server)
    server.start()
    return running


def write_port_file(path: Path | None, port: int) -> None:
    """Write the bound port (``"<port>\\n"``) atomically: a reader sees all of it or nothing."""
    if path is not None:
        atomic_write_bytes(path, f"{port}\n".encode("ascii"))


def serve_until_signal(
    stop: Callable[[float], Any],
    what: str,
    *,
    ready: Callable[[], Any] | None = None,
    grace: float = 0.5,
    exit_process: bool = True,
) -> None:
    """Block until SIGTERM or SIGINT, then ``stop(grace)`` and print ``<what> stopped`` on
    stderr in one line.

    ``ready`` runs once the signals are handled (e.g. write the port file that tells a parent
    the service is up): a SIGTERM sent right after it is a clean stop, never a kill.

    With ``exit_process`` (a service's main), the process then ends at once with status 0
    (logs flushed first) instead of tearing the interpreter down, which takes seconds with
    torch loaded; every file the services write is written atomically and synchronously, so
    nothing is lost.
    """
    done = threading.Event()
    received: list[int] = []

    def handle(signum: int, _frame: Any) -> None:
        received.append(signum)
        done.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready()
        done.wait()
        t0 = time.monotonic()
        stop(grace)
        name = signal.Signals(received[0]).name
        print(f"{what} stopped ({name}, {time.monotonic() - t0:.2f} s)", file=sys.stderr)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if not exit_process:
        return None
    tracing.shutdown()  # exported spans flushed (os._exit runs no atexit hook)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
