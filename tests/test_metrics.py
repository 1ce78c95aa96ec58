"""Prometheus metrics and per-peer limits of in-process servers (owners and coordinator).

Servers run in this process (each with its own metrics registry); the scrape goes through the
real loopback HTTP endpoint. With ``JF_WRITE_RESULTS=1`` the coordinator's scrape is written
to ``docs/results/metrics-sample.prom`` (quoted in docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from helpers_services import MODALITIES, Fed, build_fed, rpc_error
from prometheus_client.parser import text_string_to_metric_families

from jacfusion_fed.clients.serve import OwnerServer, serve_owner
from jacfusion_fed.privacy.certs import owner_server_name
from jacfusion_fed.reliability.stall import StallingClient
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc, modality_pb2
from jacfusion_fed.rpc.limits import PeerLimits
from jacfusion_fed.rpc.metrics import MetricsEndpoint, ServiceMetrics
from jacfusion_fed.rpc.tls import TransportOptions
from jacfusion_fed.server.coordinator import Coordinator, OwnerEndpoint
from jacfusion_fed.server.serve import CoordinatorServer, serve_coordinator

SAMPLE = Path(__file__).parent.parent / "docs" / "results" / "metrics-sample.prom"
PREDICT = "/jacfusion.v1.FusionService/Predict"
STREAM = "/jacfusion.v1.FusionService/PredictStream"
ALICE = "requester 'alice'"


@dataclass
class Servers:
    fed: Fed
    owners: dict[str, OwnerServer]
    coordinator: CoordinatorServer

    def stub(self) -> fusion_pb2_grpc.FusionServiceStub:
        return fusion_pb2_grpc.FusionServiceStub(
            connect_coordinator(self.coordinator.target, self.fed.requester)
        )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    fed = build_fed(tmp_path_factory.mktemp("metrics"))
    owners = {
        m: serve_owner(fed.workspaces[m], fed.owner_tls(m), metrics_port=0) for m in MODALITIES
    }
    coordinator = Coordinator(
        fed.root / "registry",
        [OwnerEndpoint(m, owners[m].target) for m in MODALITIES],
        fed.coordinator_tls,
    )
    assert coordinator.sync() == {m: "" for m in MODALITIES}
    limits = PeerLimits.for_workers(4, max_streams_per_peer=1, stall_timeout_s=1.0)
    server = serve_coordinator(
        coordinator,
        fed.coordinator_tls,
        max_workers=4,
        metrics_port=0,
        limits=limits,
        sync=False,
    )
    try:
        yield Servers(fed, owners, server)
    finally:
        server.stop(None)
        for owner in owners.values():
            owner.stop(None)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text: str = reply.read().decode()
    return text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a scrape (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def test_request_counters_and_latency_move(servers: Servers) -> None:
    guard = servers.coordinator.guard
    assert guard is not None and guard.endpoint is not None
    endpoint = guard.endpoint
    assert endpoint.host == "127.0.0.1"
    before = scrape(endpoint.url)
    stub = servers.stub()
    request = fusion_pb2.PredictRequest(sample_ids=servers.fed.ids[:4])
    for _ in range(3):
        stub.Predict(request, timeout=10)
    unknown = fusion_pb2.PredictRequest(sample_ids=["f" * 64])
    code, _ = rpc_error(lambda: stub.Predict(unknown, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    after = scrape(endpoint.url)
    ok = {"method": PREDICT, "code": "OK"}
    assert (
        sample(after, "jacfusion_rpc_requests_total", **ok)
        - sample(before, "jacfusion_rpc_requests_total", **ok)
        == 3
    )
    nf = {"method": PREDICT, "code": "NOT_FOUND"}
    assert sample(after, "jacfusion_rpc_requests_total", **nf) == 1 + sample(
        before, "jacfusion_rpc_requests_total", **nf
    )
    count = "jacfusion_rpc_latency_seconds_count"
    assert sample(after, count, method=PREDICT) - sample(before, count, method=PREDICT) == 4
    fusions = "jacfusion_fusion_seconds_count"
    assert (
        sample(after, fusions, method="jacobian") >= sample(before, fusions, method="jacobian") + 3
    )
    for m in MODALITIES:
        assert sample(after, "jacfusion_owner_up", modality=m) == 1
        version = servers.fed.workspaces[m].current_version()
        info = {"modality": m, "owner": f"{m}-co", "version": version}
        assert sample(after, "jacfusion_owner_model_version_info", **info) == 1
        owner = servers.owners[m].guard
        assert owner is not None and owner.endpoint is not None
        text = scrape(owner.endpoint.url)
        assert sample(text, "jacfusion_owner_model_version_info", **info) == 1
        logits = {"method": "/jacfusion.v1.ModalityService/GetLogits", "code": "OK"}
        assert sample(text, "jacfusion_rpc_requests_total", **logits) >= 3
    if os.environ.get("JF_WRITE_RESULTS"):
        SAMPLE.write_text(after)


def test_refusals_in_flight_and_stall_cancellation(servers: Servers) -> None:
    """One stalled stream fills alice's stream slot: a second is refused with
    RESOURCE_EXHAUSTED, Predict still works, the stall is cut after 1 s."""
    guard = servers.coordinator.guard
    assert guard is not None
    metrics = guard.metrics
    refused = {"peer": ALICE, "reason": "streams"}
    stalled = {"peer": ALICE, "reason": "stalled"}
    before = metrics.value("jacfusion_rpc_refused_total", refused) or 0.0
    cut_before = metrics.value("jacfusion_rpc_refused_total", stalled) or 0.0
    # A gRPC client with a 1 KiB window that never reads: the coordinator's writes block.
    channel = connect_coordinator(
        servers.coordinator.target,
        servers.fed.requester,
        options=TransportOptions(
            extra=(("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0))
        ),
    )
    message = fusion_pb2.PredictStreamRequest(sample_ids=servers.fed.ids, chunk_size=1)
    unread = fusion_pb2_grpc.FusionServiceStub(channel).PredictStream(message, timeout=60)
    try:
        deadline = time.monotonic() + 10
        while metrics.value("jacfusion_rpc_in_flight", {"peer": ALICE}) != 1:
            assert time.monotonic() < deadline, metrics.scrape()
            time.sleep(0.05)
        stub = servers.stub()
        second = fusion_pb2.PredictStreamRequest(sample_ids=servers.fed.ids[:4])
        code, details = rpc_error(lambda: list(stub.PredictStream(second, timeout=10)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 1 per peer" in details and ALICE in details
        assert metrics.value("jacfusion_rpc_refused_total", refused) == before + 1
        # Unary calls of the same peer are still admitted (their own limit is not reached).
        stub.Predict(fusion_pb2.PredictRequest(sample_ids=servers.fed.ids[:2]), timeout=10)
        # The stalled stream is cancelled after stall_timeout_s (1 s), freeing its slot.
        while metrics.value("jacfusion_rpc_refused_total", stalled) != cut_before + 1:
            assert time.monotonic() < deadline, metrics.scrape()
            time.sleep(0.05)
        while metrics.value("jacfusion_rpc_in_flight", {"peer": ALICE}):
            assert time.monotonic() < deadline, metrics.scrape()
            time.sleep(0.05)
        assert len(list(stub.PredictStream(second, timeout=10))) == 1
    finally:
        unread.cancel()
        channel.close()


def test_metrics_endpoint_is_loopback_only_and_per_instance() -> None:
    one, two = ServiceMetrics("owner"), ServiceMetrics("owner")
    one.finished(PREDICT, grpc.StatusCode.OK, 0.01)
    assert one.value("jacfusion_rpc_requests_total", {"method": PREDICT, "code": "OK"}) == 1
    assert two.value("jacfusion_rpc_requests_total", {"method": PREDICT, "code": "OK"}) is None
    with pytest.raises(ValueError, match="loopback"):
        MetricsEndpoint(one, 0, host="0.0.0.0")
    endpoint = MetricsEndpoint(one, 0)
    try:
        assert 'jacfusion_service{service="owner"} 1.0' in scrape(endpoint.url)
        with pytest.raises(OSError):
            MetricsEndpoint(two, endpoint.port)  # port in use
    finally:
        endpoint.close()


def test_documented_scrape_matches_the_sample() -> None:
    """Every line of the excerpt in docs/reliability.md is in the committed sample scrape."""
    doc = (SAMPLE.parent.parent / "reliability.md").read_text()
    excerpt = doc.split("`docs/results/metrics-sample.prom`; an excerpt:", 1)[1]
    lines = excerpt.split("```text\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(lines) >= 10
    have = set(SAMPLE.read_text().splitlines())
    assert [line for line in lines if line not in have] == []


def test_unanswered_pings_drop_a_peer_that_stopped_reading(servers: Servers) -> None:
    """A peer that stops reading never acknowledges the server's pings (keepalive, or the
    BDP probe sent once data flows): ``keepalive_timeout_ms`` after the first unanswered one
    the connection is closed, which ends its stalled stream, here long before the 600 s
    stall timeout (with the default 20 s timeout, about 20 s after the first ping)."""
    owner = serve_owner(
        servers.fed.workspaces["audio"],
        servers.fed.owner_tls("audio"),
        options=TransportOptions(
            keepalive_time_ms=1000, keepalive_timeout_ms=1000, server_min_ping_interval_ms=1000
        ),
        limits=PeerLimits.for_workers(8, stall_timeout_s=600.0),
    )
    guard = owner.guard
    assert guard is not None
    peer = "coordinator 'coordinator'"
    ids = servers.fed.ids + [f"{i:064x}" for i in range(2000)]
    message = modality_pb2.StreamLogitsRequest(sample_ids=ids, chunk_size=64)
    staller = StallingClient(owner.target, servers.fed.coordinator_tls, owner_server_name("audio"))
    try:
        staller.start("/jacfusion.v1.ModalityService/StreamLogits", message.SerializeToString())
        deadline = time.monotonic() + 10
        while guard.metrics.value("jacfusion_rpc_in_flight", {"peer": peer}) != 1:
            assert time.monotonic() < deadline, guard.metrics.scrape()
            time.sleep(0.02)
        stalled = time.monotonic()
        while guard.metrics.value("jacfusion_rpc_in_flight", {"peer": peer}):
            assert time.monotonic() < deadline, guard.metrics.scrape()
            time.sleep(0.05)
        assert time.monotonic() - stalled < 5
        cancelled = {"method": "/jacfusion.v1.ModalityService/StreamLogits", "code": "CANCELLED"}
        assert guard.metrics.value("jacfusion_rpc_requests_total", cancelled) == 1
        reason = {"peer": peer, "reason": "stalled"}
        assert (
            guard.metrics.value("jacfusion_rpc_refused_total", reason) is None
        )  # not the watchdog
        staller.sock.settimeout(5)
        with contextlib.suppress(ConnectionError):
            while staller.sock.recv(1 << 16):
                pass  # the connection ends: EOF or reset
    finally:
        staller.close()
        owner.stop(None)
