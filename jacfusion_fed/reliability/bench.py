"""``jacfusion-fed bench load``: a bounded load test of the coordinator with two owners.

Starts, as real processes on 127.0.0.1 with mTLS (the same deployment as
``jacfusion-fed bench serve``): two owners of a synthetic K-class dataset (trained on first
start) and the coordinator. Reads the owners' logits, heads and class counts through
``ModalityService`` with the coordinator's certificate (the oracle), then sends a fixed number
of ``Predict`` calls from many concurrent requester threads, each with its own channel, and
classifies every answer against the fusion library on those logits. Reports throughput,
latency percentiles, outcome counts and the coordinator's RSS (``/proc``) after warm-up, at
the end and at its peak.

Passes when every request was answered correctly (no error, no ``neither``) and RSS grew by
at most ``rss_bound_mb`` between the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .load import LoadConfig, run_load
from .reference import Reference, snapshot_owner

__all__ = ["LoadBenchConfig", "print_load_results", "run_load_bench"]


@dataclass(frozen=True)
class LoadBenchConfig:
    samples: int = 4096
    classes: int = 10
    features: int = 32
    requests: int = 20_000
    clients: int = 32
    batch: int = 16
    warmup: int = 1000
    method: str = "jacobian"
    timeout_s: float = 10.0
    rss_bound_mb: float = 32.0
    seed: int = 0


def run_load_bench(
    cfg: LoadBenchConfig,
    *,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run the load test (see the module docstring); returns JSON-able results."""
    import grpc

    from jacfusion_fed.bench.deployment import (
        MODALITIES,
        ServeBenchConfig,
        bench_setup,
        python_procs,
        start_deployment,
        wait_serving,
    )
    from jacfusion_fed.bench.serve import load_average
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.fusion_codec import PredictOptions, options_to_proto
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
    from jacfusion_fed.rpc.tls import TlsFiles

    data_cfg = ServeBenchConfig(
        samples=cfg.samples, classes=cfg.classes, features=cfg.features, seed=cfg.seed
    )
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "environment": {
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpu_count": os.cpu_count(),
            "load_avg_before": load_average(),
        },
    }
    with bench_setup(workdir, data_cfg, "load-requester", progress) as setup:
        procs = python_procs(setup.root)
        try:
            requester, ids = setup.requester, setup.ids
            coordinator_tls = TlsFiles.from_dir(setup.certs.coordinator_dir)
            progress("starting two owners (training on first start) and the coordinator")
            with start_deployment(
                procs, setup.root, setup.certs, setup.data, setup.key_path, "load", cached=True
            ) as targets:
                channel = connect_coordinator(targets["coordinator"], requester)
                wait_serving(channel)
                stub = fusion_pb2_grpc.FusionServiceStub(channel)
                deadline = time.monotonic() + 180
                while True:
                    info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=10)
                    if len(info.modalities) == len(MODALITIES) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                channel.close()
                progress("oracle: reading every owner's logits through ModalityService")
                reference = Reference(
                    [
                        snapshot_owner(targets["owners"][m], coordinator_tls, m, ids)
                        for m in MODALITIES
                    ]
                )
                pid = procs.procs["load-coordinator"].pid

                def make_stub() -> Any:
                    ch = connect_coordinator(targets["coordinator"], requester)
                    return fusion_pb2_grpc.FusionServiceStub(ch)

                load_cfg = LoadConfig(
                    requests=cfg.requests,
                    clients=cfg.clients,
                    batch=cfg.batch,
                    warmup=cfg.warmup,
                    timeout_s=cfg.timeout_s,
                    seed=cfg.seed,
                    options=options_to_proto(PredictOptions(method=cfg.method)),
                )
                result = run_load(make_stub, ids, load_cfg, reference, pid=pid, progress=progress)
        finally:
            procs.stop_all()
    results["load"] = result.to_json()
    results["environment"]["load_avg_after"] = load_average()
    errors = sum(v for k, v in result.outcomes.items() if k != "correct")
    growth = result.rss_growth_mb or 0.0
    results["verdict"] = {
        "all_correct": errors == 0 and result.neither == 0,
        "rss_growth_mb": growth,
        "rss_bound_mb": cfg.rss_bound_mb,
        "rss_within_bound": growth <= cfg.rss_bound_mb,
    }
    results["passed"] = results["verdict"]["all_correct"] and results["verdict"]["rss_within_bound"]
    return results


def print_load_results(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    cfg, load = results["config"], results["load"]
    lat = load["latency_ms"]
    table = Table(
        title=f"load: {load['requests']} Predict x {cfg['batch']} ids, {cfg['clients']} "
        f"clients, 2 owners, K={cfg['classes']}, {cfg['method']}, mTLS on loopback"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("requests / s", f"{load['requests_per_s']:,.0f}"),
        ("samples / s", f"{load['samples_per_s']:,.0f}"),
        ("latency p50", f"{lat['p50']:.1f} ms"),
        ("latency p99", f"{lat['p99']:.1f} ms"),
        ("latency max", f"{lat['max']:.1f} ms"),
        ("outcomes", ", ".join(f"{k}={v}" for k, v in load["outcomes"].items())),
        ("neither correct nor a clear error", str(load["neither"])),
        ("coordinator RSS after warm-up", f"{load['rss_start_mb']:.1f} MB"),
        ("coordinator RSS at the end", f"{load['rss_end_mb']:.1f} MB"),
        ("coordinator RSS peak", f"{load['rss_peak_mb']:.1f} MB"),
        ("RSS growth (bound)", f"{load['rss_growth_mb']:+.1f} MB ({cfg['rss_bound_mb']} MB)"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    env = results["environment"]
    console.print(
        f"{'PASSED' if results['passed'] else 'FAILED'}; {env['cpu_count']} CPUs, load average "
        f"before {env['load_avg_before']}, after {env.get('load_avg_after')}"
    )
