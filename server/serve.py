"""Run the coordinator's gRPC server (``FusionService``, health, reflection), and connect to it.

Only requesters may call ``Predict``/``PredictStream``
(:data:`jacfusion_fed.rpc.policies.FUSION_SERVICE_POLICY`); health checks and reflection are open
to every authenticated principal of the deployment. Health (``""`` and
``jacfusion.v1.FusionService``) is ``SERVING`` once at least one configured owner has a
registered head (from the registry on disk or from the owner), ``NOT_SERVING`` before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jacfusion_fed.audit import AuditLog
from jacfusion_fed.audit.events import head_registrations
from jacfusion_fed.audit.interceptor import AuditInterceptor
from jacfusion_fed.rpc.guard import ServerGuard
from jacfusion_fed.rpc.identity import Principal
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2_grpc
from jacfusion_fed.rpc.limits import PeerLimits
from jacfusion_fed.rpc.policies import FUSION_SERVICE, FUSION_SERVICE_POLICY
from jacfusion_fed.rpc.serving import ServiceHandle, own_identity, start_server
from jacfusion_fed.rpc.tls import (
    DEFAULT_HOST,
    Security,
    TransportOptions,
)

from .coordinator import Coordinator
from .fusion_service import FusionServicer
from .metrics import watch_coordinator

__all__ = ["CoordinatorServer", "serve_coordinator"]

log = logging.getLogger(__name__)


@dataclass
class CoordinatorServer(ServiceHandle):
    """A started coordinator server; :meth:`stop` also closes the owner channels."""

    coordinator: Coordinator

    def stop(self, grace: float | None = 1.0) -> None:
        super().stop(grace)
        self.coordinator.close()
        if self.guard is not None:
            self.guard.close()


def _heads(coordinator: Coordinator) -> dict[str, tuple[str, str]]:
    heads = {m: coordinator.head(m) for m in coordinator.modalities}
    return {m: (h.record.owner, h.record.model_version) for m, h in heads.items() if h}


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
    audit: AuditLog | None = None,
) -> CoordinatorServer:
    """Start serving ``FusionService`` for ``coordinator``.

    Args:
        coordinator: the owner registry and fusion core.
        security: the coordinator's :class:`TlsFiles` (or certificate directory), or
            :data:`jacfusion_fed.rpc.tls.INSECURE` (loopback only; every caller is then
            treated as a requester).
        host, port: address to bind (port 0 picks a free one); a non-loopback host (e.g.
            ``0.0.0.0``) is bound with a one-line warning.
        max_workers: handler threads (each Predict holds one while the owners answer).
        options: message-size and keepalive settings.
        sync: start the coordinator's background owner sync.
        metrics_port: serve Prometheus metrics on this loopback port (0: any; None: no).
        limits: per-peer limits (default :meth:`PeerLimits.for_workers` of ``max_workers``).
        audit: the coordinator's audit log (:mod:`jacfusion_fed.audit`): Predict calls and
            head registrations; closed when the server stops.

    Raises:
        ValueError: the certificate is not a coordinator certificate.
        PortInUseError: the port is taken (an ``OSError``).
        OSError: the address cannot be bound.
    """
    security, _ = own_identity(security, "coordinator")
    guard = ServerGuard.create("coordinator", max_workers, options, limits)
    watch_coordinator(guard.metrics, coordinator)
    rpc = start_server(
        security,
        policy=FUSION_SERVICE_POLICY,
        insecure_principal=Principal("requester", "insecure-requester"),
        services=(FUSION_SERVICE,),
        add_servicers=lambda server: fusion_pb2_grpc.add_FusionServiceServicer_to_server(
            FusionServicer(coordinator), server
        ),
        serving=coordinator.has_heads(),
        host=host,
        port=port,
        max_workers=max_workers,
        options=options,
        guard=guard,
        interceptors=[AuditInterceptor(audit)] if audit else (),
    )
    if audit is not None:
        rpc.on_stop(audit.close)
        coordinator.on_change(head_registrations(audit, lambda: _heads(coordinator)))
    guard.serve_metrics(metrics_port)
    coordinator.on_change(lambda: rpc.set_serving(coordinator.has_heads()))
    if sync:
        coordinator.start_sync()
    log.debug(
        "coordinator serving FusionService on %s for modalities %s",
        rpc.target,
        ", ".join(coordinator.modalities),
    )
    return CoordinatorServer(rpc, coordinator)
