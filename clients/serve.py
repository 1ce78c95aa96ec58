"""Run one modality owner's gRPC server: ``ModalityService``, health and reflection.

Each owner process serves exactly one modality under its owner certificate (checked at start:
a certificate issued for another modality, or for another role, is refused). Only the
coordinator may call ``ModalityService``
(:data:`jacfusion_fed.rpc.policies.MODALITY_SERVICE_POLICY`); health checks and reflection are
open to every authenticated principal of the deployment.

Health (``grpc.health.v1``): the overall status ``""`` and ``jacfusion.v1.ModalityService`` are
``SERVING`` while the owner has a current model version and ``NOT_SERVING`` before its first
model (polled every ``health_interval`` seconds).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from jacfusion_fed.audit import AuditLog
from jacfusion_fed.audit.interceptor import AuditInterceptor
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.rpc.guard import ServerGuard
from jacfusion_fed.rpc.identity import Principal
from jacfusion_fed.rpc.limits import PeerLimits
from jacfusion_fed.rpc.metrics import watch_owner
from jacfusion_fed.rpc.policies import MODALITY_SERVICE, MODALITY_SERVICE_POLICY
from jacfusion_fed.rpc.serving import RunningServer, ServiceHandle, own_identity, start_server
from jacfusion_fed.rpc.tls import DEFAULT_HOST, Security, TransportOptions

from .modality_service import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_STREAM_BATCH,
    DEFAULT_STREAM_CHUNK,
    ModalityServicer,
)

__all__ = ["OwnerServer", "serve_owner"]

log = logging.getLogger(__name__)


@dataclass
class OwnerServer(ServiceHandle):
    """A started owner server; :meth:`stop` it (also stops the health poller)."""

    servicer: ModalityServicer
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        super().stop(grace)


def _has_model(workspace: OwnerWorkspace) -> bool:
    try:
        return workspace.store.current_version() is not None
    except Exception as exc:  # a damaged CURRENT pointer: not serving
        log.error("owner of %r cannot read its current model: %s", workspace.modality, exc)
        return False


def _poll_health(
    workspace: OwnerWorkspace, rpc: RunningServer, stop: threading.Event, every: float, last: bool
) -> None:
    while not stop.wait(every):
        serving = _has_model(workspace)
        if serving != last:
            rpc.set_serving(serving)
            last = serving


def serve_owner(
    workspace: OwnerWorkspace,
    security: Security | str | Path,
    *,
    owner_name: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = 0,
    max_workers: int = 8,
    options: TransportOptions | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_stream_batch: int = DEFAULT_MAX_STREAM_BATCH,
    stream_chunk: int = DEFAULT_STREAM_CHUNK,
    use_logit_cache: bool = True,
    health_interval: float = 1.0,
    metrics_port: int | None = None,
    limits: PeerLimits | None = None,
    audit: AuditLog | None = None,
) -> OwnerServer:
    """Start serving ``workspace``'s modality; returns the running :class:`OwnerServer`.

    Args:
        workspace: the owner's records and model store.
        security: the owner's :class:`TlsFiles` (or its certificate directory), or
            :data:`jacfusion_fed.rpc.tls.INSECURE` (loopback only; every caller is then
            treated as the coordinator).
        owner_name: the owner's name; with TLS it is taken from the certificate (a different
            value is refused); with INSECURE it defaults to ``"<modality>-owner"``.
        host, port: address to bind (port 0 picks a free one: see ``.port``); a
            non-loopback host (e.g. ``0.0.0.0``) is bound with a one-line warning.
        max_workers: handler threads.
        options: message-size and keepalive settings.
        max_batch, max_stream_batch, stream_chunk: see :class:`ModalityServicer`.
        use_logit_cache: answer from the per-version logit cache (default).
        health_interval: seconds between checks for a current model.
        metrics_port: serve Prometheus metrics on this loopback port (0: any; None: no).
        limits: per-peer limits (default :meth:`PeerLimits.for_workers` of ``max_workers``).
        audit: the owner's audit log (:mod:`jacfusion_fed.audit`), closed when it stops.

    Raises:
        ValueError: the certificate is not an owner certificate for this modality.
        PortInUseError: the port is taken (an ``OSError``).
        OSError: the address cannot be bound.
    """
    security, principal = own_identity(security, "owner", workspace.modality)
    if principal is None:
        name = owner_name or f"{workspace.modality}-owner"
    else:
        if owner_name is not None and owner_name != principal.name:
            raise ValueError(
                f"owner name {owner_name!r} differs from the certificate's {principal.name!r}"
            )
        name = principal.name
    servicer = ModalityServicer(
        workspace,
        name,
        max_batch=max_batch,
        max_stream_batch=max_stream_batch,
        stream_chunk=stream_chunk,
        use_logit_cache=use_logit_cache,
    )
    from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2_grpc

    serving = _has_model(workspace)
    guard = ServerGuard.create("owner", max_workers, options, limits)
    watch_owner(guard.metrics, workspace, name)
    rpc = start_server(
        security,
        policy=MODALITY_SERVICE_POLICY,
        insecure_principal=Principal("coordinator", "insecure-coordinator"),
        services=(MODALITY_SERVICE,),
        add_servicers=lambda server: modality_pb2_grpc.add_ModalityServiceServicer_to_server(
            servicer, server
        ),
        serving=serving,
        host=host,
        port=port,
        max_workers=max_workers,
        options=options,
        guard=guard,
        interceptors=[AuditInterceptor(audit, modality=workspace.modality)] if audit else (),
    )
    if audit is not None:
        rpc.on_stop(audit.close)
    guard.serve_metrics(metrics_port)
    running = OwnerServer(rpc, servicer)
    threading.Thread(
        target=_poll_health,
        args=(workspace, rpc, running._stop, health_interval, serving),
        name=f"jacfusion-owner-health-{workspace.modality}",
        daemon=True,
    ).start()
    log.debug("owner %r serving modality %r on %s", name, workspace.modality, running.target)
    return running
