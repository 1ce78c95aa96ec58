"""A bounded load test on loopback: the coordinator with two owners as real processes (CLI,
mTLS), many concurrent requester threads, a fixed number of Predict calls; every answer is
checked against the fusion library on the owners' logits. Throughput, p50/p99 latency, the
error count and the coordinator's RSS (``/proc``) after warm-up and at the end.

Bounds (see docs/reliability.md): no error and no wrong answer at all; the coordinator's RSS
grows by less than ``RSS_BOUND_MB`` between the end of the warm-up and the end of the run.
The default run is short; ``-m slow`` runs ``jacfusion-fed bench load`` at full size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_reliability import Deployment
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.reliability import LoadConfig, run_load

pytestmark = pytest.mark.e2e  # owners and coordinator as processes

RSS_BOUND_MB = 32.0


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("load"), proxies=False, owner_timeout=2.0)
    try:
        d.start()
        yield d
    finally:
        d.stop()


def _report(name: str, payload: dict) -> None:  # type: ignore[type-arg]
    print(f"\n{name}: {json.dumps(payload)}")
    out = os.environ.get("JF_RELIABILITY_REPORT")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({name: payload}) + "\n")


def test_bounded_load(dep: Deployment) -> None:
    cfg = LoadConfig(requests=1500, clients=16, batch=8, warmup=300, timeout_s=10.0)
    result = run_load(dep.stub, dep.fed.ids, cfg, dep.reference(), pid=dep.coordinator_pid)
    _report("load (default run)", result.to_json())
    assert result.requests == cfg.requests  # stopped by itself after exactly that many
    assert result.outcomes == {"correct": cfg.requests}, result.neither_examples
    assert result.neither == 0
    assert result.rss_growth_mb is not None and result.rss_growth_mb < RSS_BOUND_MB
    assert result.latency_ms["p99"] < cfg.timeout_s * 1e3


def test_bounded_load_with_unknown_ids_and_every_method(dep: Deployment) -> None:
    """Mixed traffic: some requests carry an id nobody holds (skipped and listed), every
    fusion method; still only correct answers."""
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2

    for method in (1, 3, 4):
        options = fusion_pb2.FusionOptions(method=method, skip_unknown_ids=True)
        cfg = LoadConfig(
            requests=200, clients=8, batch=4, warmup=0, options=options, unknown_fraction=0.3
        )
        result = run_load(dep.stub, dep.fed.ids, cfg, dep.reference())
        assert result.outcomes == {"correct": 200}, (method, result.neither_examples)


@pytest.mark.slow
def test_bench_load_full(tmp_path: Path) -> None:
    """``jacfusion-fed bench load`` at the size reported in docs/reliability.md."""
    out = tmp_path / "bench-load.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "load",
            "--requests",
            "20000",
            "--clients",
            "32",
            "--batch",
            "16",
            "--warmup",
            "1000",
            "--rss-bound-mb",
            str(RSS_BOUND_MB),
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
    )
    payload = json.loads(out.read_text())
    _report("bench load (slow)", payload)
    assert result.exit_code == 0, result.output
    assert payload["passed"] and payload["load"]["neither"] == 0
