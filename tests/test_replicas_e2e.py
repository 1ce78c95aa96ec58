"""Coordinator replicas as real processes: failover under a bounded load, 1 vs 2 replicas.

Two owners and two coordinator replicas on one head registry (mTLS on loopback); one channel
over both replicas with gRPC's round_robin and retry policy. One replica is SIGKILLed a third
of the way through the load: with retries no request may fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jacfusion_fed.bench.replicas import ReplicaBenchConfig, run_replica_bench

pytestmark = pytest.mark.e2e


def test_killing_a_replica_under_load_loses_no_request(tmp_path: Path) -> None:
    cfg = ReplicaBenchConfig(
        samples=1024, batch=128, clients=2, block_s=1.0, blocks=1, failover_requests=200
    )
    results = run_replica_bench(cfg, workdir=tmp_path)
    retried = results["failover"]["with_retries"]
    assert retried["requests"] == 200
    assert 0 < retried["answered_before_kill"] < retried["requests"]  # killed mid-load
    assert retried["failed"] == 0, retried
    assert retried["succeeded"] == retried["requests"]
    baseline = results["failover"]["without_retries"]
    assert baseline["succeeded"] + baseline["failed"] == baseline["requests"]
    throughput = results["throughput"]
    assert throughput["one_replica_samples_per_s"] > 0
    assert throughput["two_replicas_samples_per_s"] > 0
    assert throughput["ratio_two_vs_one"] == pytest.approx(
        throughput["two_replicas_samples_per_s"] / throughput["one_replica_samples_per_s"]
    )
