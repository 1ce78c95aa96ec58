"""The coordinator's own Prometheus series: owner availability (per site too, for a modality
served by several sites), the registered model version per owner (read at scrape time) and
fusion time (observed by the fusion step, :class:`~jacfusion_fed.server.fusing.Fuser`).

The generic RPC series (requests, latency, calls in flight, refusals) come from
:class:`jacfusion_fed.rpc.metrics.ServiceMetrics`, which every server has.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from jacfusion_fed.rpc.metrics import Callback, ServiceMetrics

from .coordinator import Coordinator

__all__ = ["watch_coordinator"]


def watch_coordinator(metrics: ServiceMetrics, coordinator: Coordinator) -> None:
    """Register the coordinator's series on ``metrics``."""

    def produce() -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "jacfusion_owner_up",
            "1 when the owner has a registered head and its last call succeeded.",
            labels=["modality"],
        )
        versions = GaugeMetricFamily(
            "jacfusion_owner_model_version_info",
            "The model version registered per owner (value 1).",
            labels=["modality", "owner", "version"],
        )
        sites = GaugeMetricFamily(
            "jacfusion_owner_site_up",
            "With several sites per modality: 1 when the site's last call succeeded with the "
            "registered model version.",
            labels=["modality", "site"],
        )
        for link in coordinator.owners:  # read only, at scrape time
            head, error = link.head, link.last_error
            up.add_metric([link.modality], float(head is not None and not error))
            if head is not None:
                versions.add_metric([link.modality, head.record.owner, head.version], 1.0)
            for site in link.sites if link.multi_site else ():
                ok = head is not None and not site.last_error and site.version == head.version
                sites.add_metric([link.modality, site.target], float(ok))
        several = any(link.multi_site for link in coordinator.owners)
        return [up, versions, sites] if several else [up, versions]

    metrics.registry.register(Callback(produce))
    coordinator.batcher.on_fused(
        lambda method, seconds: metrics.fusion_seconds.labels(method=method).observe(seconds)
    )
