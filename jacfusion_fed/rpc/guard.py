"""What every server of the project gets around its servicers: fair sharing between peers,
stalled-stream cancellation and metrics (:mod:`~jacfusion_fed.rpc.limits`,
:mod:`~jacfusion_fed.rpc.metrics`), in one object for ``serve_coordinator`` / ``serve_owner``.
"""

from __future__ import annotations

from dataclasses import dataclass

from jacfusion_fed.rpc.limits import GuardInterceptor, PeerLimits, guard_options, pool_size
from jacfusion_fed.rpc.metrics import MetricsEndpoint, ServiceMetrics
from jacfusion_fed.rpc.tls import DEFAULT_HOST, TransportOptions

__all__ = ["ServerGuard"]


@dataclass
class ServerGuard:
    """Per-peer limits, metrics and the server settings derived from them.

    Use: ``guard = ServerGuard.create("coordinator", max_workers, options)``; build the server
    with ``max_workers=guard.pool``, ``options=guard.options`` and ``guard.interceptor`` first
    among the interceptors; then :meth:`serve_metrics` when a metrics port is wanted, and
    :meth:`close` when the server stops.
    """

    interceptor: GuardInterceptor
    metrics: ServiceMetrics
    pool: int
    options: TransportOptions
    endpoint: MetricsEndpoint | None = None

    @classmethod
    def create(
        cls,
        service: str,
        max_workers: int,
        options: TransportOptions | None = None,
        limits: PeerLimits | None = None,
    ) -> ServerGuard:
        limits = limits or PeerLimits.for_workers(max_workers)
        metrics = ServiceMetrics(service)
        return cls(
            GuardInterceptor(limits, metrics),
            metrics,
            pool_size(max_workers, limits),
            guard_options(options),
        )

    def serve_metrics(self, port: int | None, host: str = DEFAULT_HOST) -> None:
        """Start the loopback metrics endpoint on ``port`` (``None``: no endpoint; 0: any)."""
        if port is not None:
            self.endpoint = MetricsEndpoint(self.metrics, port, host)

    def close(self) -> None:
        self.interceptor.close()
        if self.endpoint is not None:
            self.endpoint.close()
