"""Measure fair sharing under abuse: one peer stalls many streams, another keeps calling.

:func:`measure_stall` runs the scenario of issue 13 against a running server: a victim's
latency without abuse, then ``streams`` stalled calls from the abuser
(:class:`~jacfusion_fed.reliability.stall.StallingClient`, spread over ``connections``
connections) while the victim calls again and a probe checks health every ``probe_every_s``;
the server's RSS (``VmRSS`` of ``/proc/<pid>/status``) is sampled throughout. Every figure
is returned, for the caller to check and write out.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jacfusion_fed.reliability.stall import StallingClient, stall
from jacfusion_fed.rpc.tls import TlsFiles

__all__ = ["HealthProbe", "StallResult", "measure_stall", "percentile", "rss_mb", "timed_calls"]


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest rank: the smallest value with at least
    ``q`` % of the values at or below it."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def timed_calls(call: Callable[[], Any], count: int) -> list[float]:
    """Seconds taken by each of ``count`` calls made one after the other."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


class HealthProbe:
    """Calls ``Health.Check`` every ``every_s`` on its own channel; records each latency
    (``inf`` for a failed check)."""

    def __init__(
        self,
        channel: grpc.Channel,
        every_s: float = 0.05,
        timeout_s: float = 2.0,
        rss_pid: int | None = None,
    ) -> None:
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.rss_pid = rss_pid
        self.rss_peak = 0.0
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self.stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
                self.latencies.append(time.perf_counter() - start)
            except grpc.RpcError as exc:
                self.latencies.append(math.inf)
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            if self.rss_pid is not None:
                self.rss_peak = max(self.rss_peak, rss_mb(self.rss_pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class StallResult:
    """Figures of one :func:`measure_stall` run (latencies in ms, memory in MB)."""

    streams: int
    connections: int
    victim_calls: int
    unloaded_p50_ms: float
    unloaded_p99_ms: float
    loaded_p50_ms: float
    loaded_p99_ms: float
    p99_ratio: float
    health_checks: int
    health_max_ms: float
    health_p99_ms: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_growth_mb: float
    abuser_refused: str = ""
    health_failures: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure_stall(
    *,
    target: str,
    pid: int,
    abuser: TlsFiles,
    server_name: str,
    method: str,
    message: bytes,
    victim_call: Callable[[], Any],
    health_channel: grpc.Channel,
    abuser_check: Callable[[], str] | None = None,
    streams: int = 64,
    connections: int = 16,
    victim_calls: int = 200,
    warmup_calls: int = 30,
    settle_s: float = 1.0,
    probe_every_s: float = 0.05,
) -> StallResult:
    """Run the stall scenario (see the module docstring) against ``target``.

    Args:
        target: the server under test; ``pid`` its process (for RSS).
        abuser: the stalling peer's certificate files; ``server_name`` the TLS name to check.
        method, message: the streaming call the abuser starts (``/pkg.Service/Method``,
            serialised request).
        victim_call: one call of the other peer (raises on failure).
        health_channel: channel for the health probe.
        abuser_check: called while the stall lasts; returns what a further call of the
            abuser got (e.g. ``RESOURCE_EXHAUSTED``), recorded in the result.
        streams, connections: stalled calls, and over how many connections.
        victim_calls, warmup_calls: measured and unmeasured victim calls per phase.
        settle_s: wait after starting the stall, so that the server has taken it on.
        probe_every_s: health probe period.
    """
    timed_calls(victim_call, warmup_calls)
    rss_before = rss_mb(pid)
    unloaded = timed_calls(victim_call, victim_calls)
    peak = rss_before
    clients: Sequence[StallingClient] = ()
    try:
        clients = stall(
            target, abuser, server_name, method, message, streams, connections=connections
        )
        time.sleep(settle_s)
        refused = abuser_check() if abuser_check is not None else ""
        with HealthProbe(health_channel, every_s=probe_every_s, rss_pid=pid) as probe:
            loaded = timed_calls(victim_call, victim_calls)
        peak = max(peak, probe.rss_peak, rss_mb(pid))
    finally:
        for client in clients:
            client.close()
    u99, l99 = percentile(unloaded, 99), percentile(loaded, 99)
    return StallResult(
        streams=streams,
        connections=connections,
        victim_calls=victim_calls,
        unloaded_p50_ms=percentile(unloaded, 50) * 1e3,
        unloaded_p99_ms=u99 * 1e3,
        loaded_p50_ms=percentile(loaded, 50) * 1e3,
        loaded_p99_ms=l99 * 1e3,
        p99_ratio=l99 / u99,
        health_checks=len(probe.latencies),
        health_max_ms=max(probe.latencies) * 1e3,
        health_failures=probe.failures[:5],
        health_p99_ms=percentile(probe.latencies, 99) * 1e3,
        rss_before_mb=rss_before,
        rss_peak_mb=peak,
        rss_growth_mb=peak - rss_before,
        abuser_refused=refused,
    )
