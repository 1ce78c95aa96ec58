"""Prometheus metrics of one service instance, served on an opt-in loopback HTTP port.

Every service (coordinator, owner) gets its own :class:`ServiceMetrics` with its own
``CollectorRegistry``, so that several services in one process (tests, benchmarks) never mix
their figures. :class:`jacfusion_fed.rpc.limits.GuardInterceptor` records the RPC figures;
:func:`watch_owner` (here) and ``jacfusion_fed.server.metrics.watch_coordinator`` add what only
the service knows.

Metrics (``service`` is a constant label: ``coordinator`` or ``owner``):

=======================================  =========  ==========================================
name                                     type       labels
=======================================  =========  ==========================================
``jacfusion_rpc_requests_total``         counter    ``method``, ``code`` (gRPC status name)
``jacfusion_rpc_latency_seconds``        histogram  ``method``
``jacfusion_rpc_in_flight``              gauge      ``peer`` (certificate identity or address)
``jacfusion_rpc_refused_total``          counter    ``peer``, ``reason`` (``calls``,
                                                    ``streams``: per-peer limit; ``stalled``:
                                                    a stream cancelled because its client did
                                                    not read)
``jacfusion_owner_up``                   gauge      ``modality`` (coordinator: 1 when the
                                                    owner has a registered head and its last
                                                    call succeeded)
``jacfusion_owner_model_version_info``   gauge      ``modality``, ``owner``, ``version``
                                                    (value 1; coordinator: registered head,
                                                    owner: current model)
``jacfusion_fusion_seconds``             histogram  ``method`` (one fusion call, after
                                                    batching)
=======================================  =========  ==========================================

The HTTP endpoint binds only a loopback address: metrics name peers and model versions,
which are for the operator, not for the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from jacfusion_fed.rpc.tls import DEFAULT_HOST, is_loopback

if TYPE_CHECKING:
    from jacfusion_fed.owner import OwnerWorkspace

__all__ = ["LATENCY_BUCKETS", "Callback", "MetricsEndpoint", "ServiceMetrics", "watch_owner"]

#: Seconds; from a cached owner answer (~1 ms) to a long stream or a slow owner.
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Callback(Collector):
    """A collector that asks for its samples at scrape time."""

    def __init__(self, produce: Callable[[], Iterable[Metric]]) -> None:
        self.produce = produce

    def collect(self) -> Iterable[Metric]:
        return list(self.produce())


class ServiceMetrics:
    """The metrics of one service instance (see the module docstring)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"service": service}
        self.requests = Counter(
            "jacfusion_rpc_requests",
            "RPCs answered, by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        ).labels
        self._latency = Histogram(
            "jacfusion_rpc_latency_seconds",
            "Time from admission to the end of an RPC.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._refused = Counter(
            "jacfusion_rpc_refused",
            "RPCs refused or cut off to protect the other peers.",
            ["peer", "reason"],
            registry=self.registry,
        )
        self.fusion_seconds = Histogram(
            "jacfusion_fusion_seconds",
            "Duration of one fusion call (after batching).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(Callback(lambda: [_info("jacfusion_service", labels)]))

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Record one RPC that ended with ``code`` after ``seconds``."""
        self.requests(method=method, code=code.name).inc()
        self._latency.labels(method=method).observe(seconds)

    def refused(self, peer: str, reason: str) -> None:
        """Record a call refused (``calls``/``streams``) or cut off (``stalled``)."""
        self._refused.labels(peer=peer, reason=reason).inc()

    def watch_in_flight(self, in_flight: Callable[[], Mapping[str, int]]) -> None:
        """Export ``in_flight()`` (peer -> calls running) as ``jacfusion_rpc_in_flight``."""

        def produce() -> Iterable[Metric]:
            gauge = GaugeMetricFamily(
                "jacfusion_rpc_in_flight", "RPCs running now, per peer.", labels=["peer"]
            )
            for peer, count in sorted(in_flight().items()):
                gauge.add_metric([peer], count)
            yield gauge

        self.registry.register(Callback(produce))

    def scrape(self) -> str:
        """The text exposition format, as the HTTP endpoint serves it."""
        return generate_latest(self.registry).decode()

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's value (tests); ``None`` when absent."""
        got: float | None = self.registry.get_sample_value(name, dict(labels or {}))
        return got


def _info(name: str, labels: Mapping[str, str]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, "Constant 1, labelled.", labels=list(labels))
    gauge.add_metric(list(labels.values()), 1.0)
    return gauge


def watch_owner(metrics: ServiceMetrics, workspace: OwnerWorkspace, owner: str) -> None:
    """The owner's current model version (read at scrape time)."""

    def produce() -> Iterable[Metric]:
        versions = GaugeMetricFamily(
            "jacfusion_owner_model_version_info",
            "The model version this owner serves (value 1).",
            labels=["modality", "owner", "version"],
        )
        try:
            version = workspace.store.current_version()
        except Exception:  # a damaged store: no version to report (health says NOT_SERVING)
            version = None
        if version is not None:
            versions.add_metric([workspace.modality, owner, version], 1.0)
        return [versions]

    metrics.registry.register(Callback(produce))


class MetricsEndpoint:
    """The HTTP endpoint of a :class:`ServiceMetrics` (``GET /metrics``) on a loopback port.

    Args:
        metrics: what to serve.
        port: port to bind (0 picks a free one: see ``.port``).
        host: a loopback address (anything else is refused).

    Raises:
        ValueError: ``host`` is not a loopback address.
        OSError: the port cannot be bound (e.g. in use).
    """

    def __init__(self, metrics: ServiceMetrics, port: int, host: str = DEFAULT_HOST) -> None:
        if not is_loopback(host):
            raise ValueError(f"the metrics endpoint binds only a loopback address, not {host!r}")
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port: int = self._server.server_port
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._server.shutdown()
            self._server.server_close()
