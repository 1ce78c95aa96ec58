"""Run the coordinator's gRPC server (``FusionService``, health, reflection), and connect to it.

Only requesters may call ``Predict``/``PredictStream``
(:data:`jacfusion_fed.rpc.auth.FUSION_SERVICE_POLICY`); health checks and reflection are open
to every authenticated principal of the deployment. Health (``""`` and
``jacfusion.v1.FusionService``) is ``SERVING`` once at least one configured owner has a
registered head (from the registry on disk or from the owner), ``NOT_SERVING`` before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jacfusion_fed.privacy.certs import COORDINATOR_SERVER_NAME
from jacfusion_fed.rpc.auth import (
    FUSION_SERVICE,
    FUSION_SERVICE_POLICY,
    AuthInterceptor,
    Principal,
    RpcPolicy,
    check_own_certificate,
)
from jacfusion_fed.rpc.guard import ServerGuard
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
from jacfusion_fed.rpc.limits import PeerLimits
from jacfusion_fed.rpc.metrics import watch_coordinator
from jacfusion_fed.rpc.tls import (
    DEFAULT_HOST,
    Insecure,
    Security,
    TlsFiles,
    TransportOptions,
    create_channel,
    create_server,
)

from .coordinator import Coordinator
from .fusion_service import FusionServicer

__all__ = [
    "CoordinatorServer",
    "connect_coordinator",
    "fusion_policy",
    "serve_coordinator",
]

log = logging.getLogger(__name__)


def fusion_policy() -> RpcPolicy:
    """The access rules of this server (:data:`FUSION_SERVICE_POLICY`; health and reflection
    open to every authenticated principal)."""
    return FUSION_SERVICE_POLICY


@dataclass
class CoordinatorServer:
    """A started coordinator server; :meth:`stop` also closes the owner channels."""

    server: grpc.Server
    port: int
    host: str
    coordinator: Coordinator
    health: health.HealthServicer
    guard: ServerGuard | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.coordinator.close()
        if self.guard is not None:
            self.guard.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve_coordinator(
    coordinator: Coordinator,
    security: Security | str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    max_workers: int = 16,
    options: TransportOptions | None = None,
    sync: bool = True,
    metrics_port: int | None = None,
    limits: PeerLimits | None = None,
) -> CoordinatorServer:
    """Start serving ``FusionService`` for ``coordinator``.

    Args:
        coordinator: the owner registry and fusion core.
        security: the coordinator's :class:`TlsFiles` (or certificate directory), or
            :data:`jacfusion_fed.rpc.tls.INSECURE` (loopback only; every caller is then
            treated as a requester).
        host, port: address to bind (port 0 picks a free one).
        max_workers: handler threads (each Predict holds one while the owners answer).
        options: message-size and keepalive settings.
        sync: start the coordinator's background owner sync.
        metrics_port: serve Prometheus metrics on this loopback port (0: any; None: no).
        limits: per-peer limits (default :meth:`PeerLimits.for_workers` of ``max_workers``).

    Raises:
        ValueError: the certificate is not a coordinator certificate.
        OSError: the address cannot be bound.
    """
    if isinstance(security, Insecure):
        interceptor = AuthInterceptor(
            fusion_policy(), insecure_principal=Principal("requester", "insecure-requester")
        )
    else:
        security = security if isinstance(security, TlsFiles) else TlsFiles.from_dir(security)
        check_own_certificate(security, "coordinator")
        interceptor = AuthInterceptor(fusion_policy())
    guard = ServerGuard.create("coordinator", max_workers, options, limits)
    server, bound = create_server(
        security, host=host, port=port, max_workers=guard.pool,
        interceptors=[guard.interceptor, interceptor], options=guard.options,
    )  # fmt: skip
    watch_coordinator(guard.metrics, coordinator)
    guard.serve_metrics(metrics_port)
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(FusionServicer(coordinator), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)

    def update_health() -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if coordinator.has_heads()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", FUSION_SERVICE):
            health_servicer.set(name, status)

    update_health()
    coordinator.on_change(update_health)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    server.start()
    if sync:
        coordinator.start_sync()
    log.info(
        "coordinator serving FusionService on %s:%d for modalities %s",
        host, bound, ", ".join(coordinator.modalities),
    )  # fmt: skip
    return CoordinatorServer(server, bound, host, coordinator, health_servicer, guard)


def connect_coordinator(
    target: str, security: Security | str | Path, *, options: TransportOptions | None = None
) -> grpc.Channel:
    """A requester's channel to the coordinator at ``target``.

    With TLS the server certificate must name the coordinator
    (:data:`jacfusion_fed.privacy.certs.COORDINATOR_SERVER_NAME`), so an owner's (or anyone
    else's) certificate from the same CA is refused.
    """
    if isinstance(security, Insecure):
        return create_channel(target, security, options=options)
    return create_channel(target, security, server_name=COORDINATOR_SERVER_NAME, options=options)
