"""``jacfusion-fed bench serve``: the online path measured end to end, against a bare gRPC echo.

Everything runs as real processes on 127.0.0.1 with mTLS, started by this benchmark:

* ``owners`` owners (``jacfusion-fed owner serve``; two by default, ``--owners N``), each
  with its own modality of a synthetic K-class dataset (Gaussian class means plus noise; an
  MLP trained for a few epochs), so that batches of ``batch`` distinct ids exist;
* the coordinator (``jacfusion-fed coordinator serve``);
* an echo server (``python -m jacfusion_fed.bench.serve echo``, see :mod:`.deployment`) built
  with the very same :func:`jacfusion_fed.rpc.tls.create_server` settings, certificate, auth
  interceptor and thread count as the coordinator, answering one generic method with its
  request bytes.

The requester side (this process) measures, interleaving blocks of the two so that load from
other jobs on the machine affects both alike:

* latency of single-sample ``Predict`` (p50 / p99) and of the echo round trip (same channel
  settings: requester certificate, coordinator server name, same payload size as the Predict
  request); the target is ``p50(Predict) <= 3 x 2 x p50(echo)``;
* throughput of ``Predict`` with batches of ``batch`` distinct ids from ``clients``
  concurrent requester threads (samples/s).

Both are measured with the owners answering from their logit cache (logits computed once per
model version) and, unless ``uncached=False``, again with owners restarted with
``--no-logit-cache`` (a forward pass over the requested records for every call).
"""

from __future__ import annotations

import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.bench.deployment import (
    ECHO_METHOD,
    ServeBenchConfig,
    bench_setup,
    python_procs,
    serve_echo,
    start_deployment,
    wait_serving,
)

__all__ = [
    "P50_RATIO_TARGET",
    "THROUGHPUT_TARGET",
    "environment",
    "load_average",
    "measure",
    "print_results",
    "run_serve_bench",
    "start_echo",
    "target_summary",
    "throughput",
]

#: Targets of the online path: p50 of a 1-sample Predict against two echo round trips, and
#: samples/s with the owners' logit cache.
P50_RATIO_TARGET = 3.0
THROUGHPUT_TARGET = 50_000

# --- measurements ------------------------------------------------------------------------------


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1e6
    return {
        "p50_us": float(np.percentile(arr, 50)),
        "p99_us": float(np.percentile(arr, 99)),
        "mean_us": float(arr.mean()),
        "n": len(samples),
    }


def _latency(
    predict: Callable[[], Any], echo: Callable[[], Any], total: int, block: int
) -> tuple[list[float], list[float]]:
    for _ in range(min(200, total)):  # warm-up: connections, caches, code paths
        predict()
        echo()
    pred: list[float] = []
    bare: list[float] = []
    clock = time.perf_counter
    while len(pred) < total:
        for fn, out in ((predict, pred), (echo, bare)):
            for _ in range(block):
                t0 = clock()
                fn()
                out.append(clock() - t0)
    return pred[:total], bare[:total]


def throughput(
    make_call: Callable[[], Callable[[list[str]], Any]],
    ids: list[str],
    batch: int,
    clients: int,
    duration: float,
) -> dict[str, float]:
    stop = threading.Event()
    counts = [0] * clients
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        call = make_call()
        rng = random.Random(i)
        try:
            while not stop.is_set():
                start = rng.randrange(0, len(ids) - batch + 1)
                call(ids[start : start + batch])
                counts[i] += 1
        except BaseException as exc:
            errors.append(exc)

    for _ in range(3):  # warm-up
        make_call()(ids[:batch])
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"throughput run failed: {errors[0]!r}")
    requests = sum(counts)
    return {
        "batch": batch,
        "clients": clients,
        "requests": requests,
        "seconds": elapsed,
        "samples_per_s": requests * batch / elapsed,
        "ms_per_request": 1e3 * elapsed * clients / max(requests, 1),
    }


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (benchmarks record them: the machine may be shared)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure(
    cfg: ServeBenchConfig,
    targets: dict[str, Any],
    echo_target: str,
    requester: Any,
    ids: list[str],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Latency (single-sample Predict against echo round trips, interleaved) and throughput
    of the coordinator at ``targets["coordinator"]``, once it knows ``cfg.owners`` heads."""
    import grpc

    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.fusion_codec import PredictOptions, options_to_proto
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc

    coord_channel = connect_coordinator(targets["coordinator"], requester)
    wait_serving(coord_channel)
    stub = fusion_pb2_grpc.FusionServiceStub(coord_channel)
    options = options_to_proto(PredictOptions(method=cfg.method))
    # The coordinator is SERVING once one head is known; wait until both are.
    deadline = time.monotonic() + 120
    while True:
        info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=10)
        if len(info.modalities) == cfg.owners or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    echo_channel = connect_coordinator(echo_target, requester)
    echo_call = echo_channel.unary_unary(ECHO_METHOD)
    # One random patient per request (pre-built, so that building them is not timed).
    rng = random.Random(cfg.seed)
    singles = [
        fusion_pb2.PredictRequest(sample_ids=[rng.choice(ids)], options=options) for _ in range(512)
    ]
    payload = singles[0].SerializeToString()  # the echo carries a request of the same size
    # Owners build their logit cache on the first request (a forward pass over all their
    # records, longer than the owner timeout at large K on a busy machine): wait until one
    # request uses every modality before anything is timed.
    while True:
        resp = stub.Predict(singles[0], timeout=60)
        if all(all(m.used) for m in resp.predictions.modalities):
            break
        if time.monotonic() > deadline + 120:
            left = [m.modality for m in resp.predictions.modalities if not all(m.used)]
            raise RuntimeError(
                f"modalities {left} were left out: "
                + "; ".join(m.error for m in resp.predictions.modalities if m.error)
            )
        time.sleep(0.5)
    turn = iter(range(1 << 62))

    def predict_one() -> Any:
        resp = stub.Predict(singles[next(turn) % len(singles)], timeout=10)
        if not all(all(m.used) for m in resp.predictions.modalities):
            raise RuntimeError("a modality was left out during the benchmark")
        return resp

    def echo_one() -> Any:
        return echo_call(payload, timeout=10)

    progress(f"latency: {cfg.latency_requests} single-sample Predict vs echo round trips")
    pred, bare = _latency(predict_one, echo_one, cfg.latency_requests, cfg.block)
    lat: dict[str, Any] = {"predict": _percentiles(pred), "echo": _percentiles(bare)}
    lat["p50_ratio_vs_two_echo"] = lat["predict"]["p50_us"] / (2 * lat["echo"]["p50_us"])
    lat["p99_ratio_vs_two_echo"] = lat["predict"]["p99_us"] / (2 * lat["echo"]["p99_us"])

    def make_call() -> Callable[[list[str]], Any]:
        channel = connect_coordinator(targets["coordinator"], requester)
        client = fusion_pb2_grpc.FusionServiceStub(channel)

        def call(batch_ids: list[str]) -> Any:
            resp = client.Predict(
                fusion_pb2.PredictRequest(sample_ids=batch_ids, options=options), timeout=30
            )
            if len(resp.predictions.sample_ids) != len(batch_ids):
                raise RuntimeError("incomplete batch")
            return resp

        return call

    progress(f"throughput: batches of {cfg.batch}, {cfg.clients} clients, {cfg.duration_s} s")
    thr = throughput(make_call, ids, cfg.batch, cfg.clients, cfg.duration_s)
    coord_channel.close()
    echo_channel.close()
    del grpc
    return {"latency": lat, "throughput": thr}


def environment() -> dict[str, Any]:
    """Versions, threads, machine and the load average now (the ``environment`` of the JSON)."""
    import grpc
    import torch

    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "os": platform.platform(),
        "fusion_device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_avg_before": load_average(),
    }


def start_echo(procs: Any, root: Path, tls_dir: Path) -> str:
    """Start the bare gRPC echo server (coordinator's settings); its target."""
    echo_port = root / "echo.port"
    procs.start_serving(
        "echo",
        ["-m", "jacfusion_fed.bench.serve", "echo", str(tls_dir), str(echo_port)],
        echo_port,
    )
    return f"127.0.0.1:{procs.wait_port('echo', echo_port)}"


def run_serve_bench(
    cfg: ServeBenchConfig,
    *,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the results as JSON-able dict."""
    if cfg.samples < cfg.batch:
        raise ValueError(f"samples ({cfg.samples}) must be >= batch ({cfg.batch})")
    results: dict[str, Any] = {"config": asdict(cfg), "environment": environment()}
    with bench_setup(workdir, cfg, "bench-requester", progress) as setup:
        root, certs = setup.root, setup.certs
        procs = python_procs(root)
        try:
            echo_target = start_echo(procs, root, certs.coordinator_dir)
            runs = [("cached", True)] + ([("uncached", False)] if cfg.uncached else [])
            for tag, cached in runs:
                progress(f"{tag}: starting owners (training on first start) and the coordinator")
                with start_deployment(
                    procs, root, certs, setup.data, setup.key_path, tag, cached=cached
                ) as targets:
                    results[tag] = measure(
                        cfg, targets, echo_target, setup.requester, setup.ids, progress
                    )
            results["environment"]["load_avg_after"] = load_average()
            results["targets"] = target_summary(results)
        finally:
            procs.stop_all()
    return results


def print_results(results: dict[str, Any], console: Any) -> None:
    """A rich table of :func:`run_serve_bench`'s results (one column per owner mode)."""
    from rich.table import Table

    cfg = results["config"]
    env = results["environment"]
    tags = [t for t in ("cached", "uncached") if t in results]
    table = Table(
        title=f"online path: {cfg.get('owners', 2)} owners, K={cfg['classes']}, "
        f"{cfg['method']}, mTLS on loopback"
    )
    table.add_column("")
    for tag in tags:
        table.add_column("logit cache" if tag == "cached" else "no logit cache", justify="right")

    def row(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
        table.add_row(label, *(fmt(results[t]) for t in tags))

    row("Predict p50 (1 sample)", lambda r: f"{r['latency']['predict']['p50_us'] / 1e3:.2f} ms")
    row("Predict p99", lambda r: f"{r['latency']['predict']['p99_us'] / 1e3:.2f} ms")
    row("echo p50 (same settings)", lambda r: f"{r['latency']['echo']['p50_us'] / 1e3:.2f} ms")
    row("echo p99", lambda r: f"{r['latency']['echo']['p99_us'] / 1e3:.2f} ms")
    row(
        "p50 / (2 x echo p50)",
        lambda r: (
            f"{r['latency']['p50_ratio_vs_two_echo']:.2f}x "
            + _verdict(r["latency"]["p50_ratio_vs_two_echo"] <= P50_RATIO_TARGET)
        ),
    )
    row("p99 / (2 x echo p99)", lambda r: f"{r['latency']['p99_ratio_vs_two_echo']:.2f}x")
    row(
        f"samples/s, batches of {cfg['batch']}",
        lambda r: (
            f"{r['throughput']['samples_per_s']:,.0f}"
            + (
                " " + _verdict(r["throughput"]["samples_per_s"] >= THROUGHPUT_TARGET)
                if r is results.get("cached")
                else ""
            )
        ),
    )
    row("ms per batch (per client)", lambda r: f"{r['throughput']['ms_per_request']:.1f}")
    console.print(table)
    console.print(
        f"Targets: p50 <= {P50_RATIO_TARGET:.2f}x two echo round trips; >= "
        f"{THROUGHPUT_TARGET:,} samples/s with the logit cache ({target_summary(results)}). "
        f"{env['cpu_count']} CPUs, fusion on {env['fusion_device']}, {cfg['clients']} requester "
        f"threads; load average before {env['load_avg_before']}, after "
        f"{env.get('load_avg_after')} (other jobs on the machine inflate both figures).",
        highlight=False,
    )


def _verdict(met: bool) -> str:
    return "(met)" if met else "(missed)"


def target_summary(results: dict[str, Any]) -> str:
    """``met``/``missed`` per target and owner mode, in words (also for the JSON)."""
    parts = []
    for tag in ("cached", "uncached"):
        if tag not in results:
            continue
        ratio = results[tag]["latency"]["p50_ratio_vs_two_echo"]
        parts.append(f"p50 {tag}: {ratio:.2f}x {'met' if ratio <= P50_RATIO_TARGET else 'missed'}")
    if "cached" in results:
        rate = results["cached"]["throughput"]["samples_per_s"]
        met = "met" if rate >= THROUGHPUT_TARGET else "missed"
        parts.append(f"throughput cached: {rate:,.0f}/s {met}")
    return "; ".join(parts)


def _main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "echo":
        serve_echo(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None)
        return
    raise SystemExit("usage: python -m jacfusion_fed.bench.serve echo TLS_DIR [PORT_FILE]")


if __name__ == "__main__":
    _main(sys.argv[1:])
