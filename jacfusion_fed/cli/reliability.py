"""``jacfusion-fed bench load`` (bounded load test with the correctness oracle) and
``jacfusion-fed proxy`` (a fault-injecting TCP proxy on loopback, for manual fault drills)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from jacfusion_fed.cli.bench import bench_app

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


@bench_app.command("load")
def bench_load(
    requests: Annotated[int, typer.Option(help="Predict calls (timed, checked).", min=1)] = 20_000,
    clients: Annotated[int, typer.Option(help="Concurrent requester threads.", min=1)] = 32,
    batch: Annotated[int, typer.Option(help="Ids per request.", min=1)] = 16,
    warmup: Annotated[int, typer.Option(help="Untimed calls first.", min=0)] = 1000,
    samples: Annotated[int, typer.Option(help="Records per owner.", min=64)] = 4096,
    classes: Annotated[int, typer.Option(help="K.", min=2)] = 10,
    method: Annotated[str, typer.Option(help="Fusion method.")] = "jacobian",
    rss_bound_mb: Annotated[
        float, typer.Option(help="Largest accepted RSS growth of the coordinator (MB).")
    ] = 32.0,
    timeout: Annotated[float, typer.Option(help="Deadline of every call (s).")] = 10.0,
    workdir: Annotated[Path | None, typer.Option(help="Keep the run's files here.")] = None,
    out: Annotated[Path, typer.Option(help="JSON results.")] = Path("bench-load.json"),
) -> None:
    """Coordinator + two owners on loopback (mTLS): a fixed number of Predict calls from many
    clients, each answer checked against the fusion library; throughput, p50/p99 latency,
    errors, and the coordinator's memory after warm-up and at the end. Exit code 1 unless
    every answer was correct and RSS grew by at most --rss-bound-mb."""
    from jacfusion_fed.reliability.bench import (
        LoadBenchConfig,
        print_load_results,
        run_load_bench,
    )

    if method not in ("statistical", "jacobian", "mean", "confidence_mean"):
        raise typer.BadParameter(f"unknown --method {method!r}")
    if batch > samples:
        raise typer.BadParameter("--batch must not exceed --samples")
    cfg = LoadBenchConfig(
        samples=samples, classes=classes, requests=requests, clients=clients, batch=batch,
        warmup=warmup, method=method, timeout_s=timeout, rss_bound_mb=rss_bound_mb,
    )  # fmt: skip
    results = run_load_bench(cfg, workdir=workdir, progress=lambda m: err_console.log(m))
    print_load_results(results, console)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")
    if not results["passed"]:
        raise typer.Exit(1)


def proxy(
    upstream: Annotated[str, typer.Option(help="HOST:PORT to forward to.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Local port (0: any).", min=0)] = 0,
    delay: Annotated[float, typer.Option(help="Added latency per chunk (s).", min=0)] = 0.0,
    drop_rate: Annotated[
        float, typer.Option(help="Probability of dropping a chunk.", min=0, max=1)
    ] = 0.0,
    stall_every: Annotated[
        float, typer.Option(help="Blackhole the link every this many seconds (0: never).")
    ] = 0.0,
    stall_for: Annotated[float, typer.Option(help="... for this many seconds.")] = 2.0,
) -> None:
    """A fault-injecting TCP proxy on --host (point the coordinator's --owner at it);
    runs until SIGTERM/SIGINT."""
    from jacfusion_fed.reliability.proxy import FaultProxy

    try:
        running = FaultProxy(upstream, host=host, port=port).start()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    running.set(delay_s=delay, drop_rate=drop_rate)
    console.print(f"proxy {running.host}:{running.port} -> {upstream}")
    done = threading.Event()

    def stop(*_: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not done.is_set():
        if stall_every > 0 and not done.wait(stall_every):
            running.set(stalled=True)
            done.wait(stall_for)
            running.set(stalled=False)
        else:
            done.wait(1.0)
    running.stop()
    console.print(f"stopped; {vars(running.stats)}")


def register(app: typer.Typer) -> None:
    app.command("proxy")(proxy)
