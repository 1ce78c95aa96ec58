"""``jacfusion-fed bench ...``: measured figures, always against a baseline run alongside.

``bench fusion`` (the solver against a scipy loop), ``bench serve`` (Predict against a bare
gRPC echo) and ``bench load`` (a bounded load test with the correctness oracle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.options import FUSION_METHODS, check_choice
from jacfusion_fed.cli.render import err, out, write_json

bench_app = typer.Typer(help="Benchmarks: figures as ratios against a baseline in the same run.")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError as exc:
        raise CliError(f"--ks must be comma-separated integers, got {text!r}") from exc
    if not ks or any(k < 2 for k in ks):
        raise CliError("--ks needs at least one K >= 2")
    return ks


def _progress(message: str) -> None:
    """A progress line on stderr: the time and the message (no source location)."""
    import time

    err().print(f"[{time.strftime('%H:%M:%S')}] {message}", highlight=False, markup=False)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


@bench_app.command("fusion")
def fusion(
    ks: Annotated[str, typer.Option(help="Comma-separated class counts K.")] = "10,100,309,1000",
    samples: Annotated[int, typer.Option(help="N, samples per K.", min=1)] = 10_000,
    solvers: Annotated[str, typer.Option(help="Solvers to time.")] = "exact,fast",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float64 or float32 inputs.")] = "float64",
    tol: Annotated[float, typer.Option(help="Bound on max |p - p_exact| for 'fast'.")] = 1e-4,
    budget: Annotated[float, typer.Option(help="Seconds to spend per measurement.")] = 2.0,
    forward: Annotated[bool, typer.Option(help="Also time fusion vs the AV-Digits nets.")] = True,
    out_file: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path(
        "bench-fusion.json"
    ),
) -> None:
    """Samples/s of jacobian_fusion per solver against a per-sample scipy Sylvester loop."""
    import torch

    from jacfusion_fed.bench.fusion import (
        bench_forward_vs_fusion,
        bench_fusion,
        environment,
        rows_to_json,
    )

    check_choice("--dtype", dtype, ("float64", "float32"))
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    names = [s for s in solvers.split(",") if s]
    rows = bench_fusion(
        _parse_ks(ks),
        samples,
        solvers=names,
        device=device,
        dtype=getattr(torch, dtype),
        tol=tol,
        budget_s=budget,
        progress=_progress,
    )
    from rich.table import Table

    table = Table(title=f"jacobian_fusion throughput ({device}, {dtype}, gamma=0.5, 1 step)")
    table.add_column("K", justify="right")
    table.add_column("method")
    table.add_column("samples/s", justify="right")
    table.add_column("x scipy loop", justify="right")
    table.add_column("max |dp|", justify="right")
    table.add_column("vs", justify="left")
    table.add_column("measured on", justify="right")
    for row in rows:
        for name, res in row.methods.items():
            speed = row.speedup(name)
            diff = res.max_abs_diff_vs_reference
            table.add_row(
                str(row.num_classes),
                name,
                _rate(res.samples_per_s),
                f"{speed:,.1f}" if speed is not None else "",
                f"{diff:.1e}" if diff is not None else "",
                res.reference or "",
                f"{res.samples} samples",
            )
    console = out()
    console.print(table)
    payload = {"environment": environment(), "rows": rows_to_json(rows)}
    if forward:
        ratio = bench_forward_vs_fusion(device=device)
        payload["fusion_vs_forward"] = ratio
        console.print(
            f"AV-Digits, {int(ratio['samples'])} samples: unimodal forward passes "
            f"{ratio['forward_s'] * 1e3:.1f} ms, fusion {ratio['fusion_s'] * 1e3:.2f} ms "
            f"({100 * ratio['fusion_over_forward']:.1f}% of the forward passes)"
        )
    write_json(out_file, payload)


@bench_app.command("serve")
def bench_serve(
    samples: Annotated[
        int, typer.Option(help="Records per owner (distinct ids).", min=1024)
    ] = 4096,
    classes: Annotated[int, typer.Option(help="K.", min=2)] = 10,
    batch: Annotated[int, typer.Option(help="Batch size for the throughput run.", min=1)] = 1024,
    latency_requests: Annotated[
        int, typer.Option(help="Single-sample requests timed.", min=10)
    ] = 2000,
    duration: Annotated[float, typer.Option(help="Seconds per throughput run.")] = 8.0,
    clients: Annotated[int, typer.Option(help="Concurrent requester threads.", min=1)] = 2,
    method: Annotated[str, typer.Option(help="Fusion method timed.")] = "jacobian",
    uncached: Annotated[
        bool, typer.Option(help="Also run with the owners' logit cache off.")
    ] = True,
    owners: Annotated[
        int,
        typer.Option(
            help="Owners, one modality each (audio, image, then synthetic ones).", min=2, max=64
        ),
    ] = 2,
    workdir: Annotated[Path | None, typer.Option(help="Keep the run's files here.")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path(
        "bench-serve.json"
    ),
) -> None:
    """Predict latency against a bare gRPC echo (same run, same TLS settings) and throughput."""
    check_choice("--method", method, FUSION_METHODS)
    from jacfusion_fed.bench.deployment import ServeBenchConfig
    from jacfusion_fed.bench.serve import print_results, run_serve_bench

    config = ServeBenchConfig(
        samples=samples,
        classes=classes,
        batch=batch,
        latency_requests=latency_requests,
        duration_s=duration,
        clients=clients,
        method=method,
        uncached=uncached,
        owners=owners,
    )
    results = run_serve_bench(config, workdir=workdir, progress=_progress)
    print_results(results, out())
    write_json(out_file, results)


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
    out_file: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path(
        "bench-load.json"
    ),
) -> None:
    """Coordinator + two owners on loopback (mTLS): a fixed number of Predict calls from many
    clients, each answer checked against the fusion library.

    Reports throughput, p50/p99 latency, errors, and the coordinator's memory after warm-up and
    at the end. Exit code 1 unless every answer was correct and RSS grew by at most
    --rss-bound-mb.
    """
    from jacfusion_fed.reliability.bench import (
        LoadBenchConfig,
        print_load_results,
        run_load_bench,
    )

    check_choice("--method", method, FUSION_METHODS)
    if batch > samples:
        raise CliError("--batch must not exceed --samples")
    cfg = LoadBenchConfig(
        samples=samples,
        classes=classes,
        requests=requests,
        clients=clients,
        batch=batch,
        warmup=warmup,
        method=method,
        timeout_s=timeout,
        rss_bound_mb=rss_bound_mb,
    )
    results = run_load_bench(cfg, workdir=workdir, progress=_progress)
    print_load_results(results, out())
    write_json(out_file, results)
    if not results["passed"]:
        raise typer.Exit(1)


def _parse_counts(option: str, text: str, least: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise CliError(f"{option} must be comma-separated integers, got {text!r}") from exc
    if not values or any(v < least for v in values):
        raise CliError(f"{option} needs at least one value, each >= {least}")
    return values


@bench_app.command("sweep")
def bench_sweep(
    ks: Annotated[str, typer.Option(help="Comma-separated class counts K.")] = "10,100,1000",
    owners: Annotated[
        str, typer.Option(help="Comma-separated owner counts (one modality each).")
    ] = "2,4,8",
    samples: Annotated[
        int, typer.Option(help="Records per owner (distinct ids).", min=1024)
    ] = 4096,
    batch: Annotated[int, typer.Option(help="Batch size for the throughput run.", min=1)] = 1024,
    latency_requests: Annotated[
        int, typer.Option(help="Single-sample requests timed per point.", min=10)
    ] = 400,
    duration: Annotated[float, typer.Option(help="Seconds per throughput run.")] = 3.0,
    clients: Annotated[int, typer.Option(help="Concurrent requester threads.", min=1)] = 2,
    method: Annotated[str, typer.Option(help="Fusion method timed.")] = "jacobian",
    workdir: Annotated[Path | None, typer.Option(help="Keep the run's files here.")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path(
        "bench-serve-sweep.json"
    ),
    plot: Annotated[
        Path | None, typer.Option(help="Plot file (.png or .svg; default: --out with .png).")
    ] = None,
) -> None:
    """bench serve's p50 ratio and throughput (logit cache on) over K x owners, in one run."""
    check_choice("--method", method, FUSION_METHODS)
    from jacfusion_fed.bench.sweep import SweepConfig, plot_sweep, run_sweep

    config = SweepConfig(
        ks=_parse_counts("--ks", ks, 2),
        owners=_parse_counts("--owners", owners, 2),
        samples=samples,
        batch=batch,
        latency_requests=latency_requests,
        duration_s=duration,
        clients=clients,
        method=method,
    )
    if batch > samples:
        raise CliError("--batch must not exceed --samples")
    plot_path = plot or out_file.with_suffix(".png")
    if plot_path.suffix not in (".png", ".svg"):
        raise CliError(f"--plot must end in .png or .svg, got {plot_path.name!r}")
    results = run_sweep(config, workdir=workdir, progress=_progress)
    write_json(out_file, results)
    plot_sweep(results, plot_path)
    from rich.table import Table

    table = Table(title=f"bench sweep: {method}, batches of {batch}, logit cache on")
    for col in ("K", "owners", "p50 (ms)", "echo p50 (ms)", "p50 / 2 echo", "samples/s", "load"):
        table.add_column(col, justify="right")
    for row in results["rows"]:
        if "error" in row:
            table.add_row(str(row["classes"]), str(row["owners"]), "failed", row["error"])
            continue
        lat, thr = row["latency"], row["throughput"]
        table.add_row(
            str(row["classes"]),
            str(row["owners"]),
            f"{lat['predict']['p50_us'] / 1e3:.2f}",
            f"{lat['echo']['p50_us'] / 1e3:.2f}",
            f"{lat['p50_ratio_vs_two_echo']:.2f}x",
            f"{thr['samples_per_s']:,.0f}",
            f"{row['load_avg_before'][0] if row['load_avg_before'] else ''}",
        )
    console = out()
    console.print(table)
    for t in results["targets"]:
        console.print(
            f"K={t['classes']}, {t['owners']} owners, {t['what']}: {t['measured']:,.2f} "
            f"(target {t['target']:,}) {'met' if t['met'] else 'missed'}",
            highlight=False,
        )
    console.print(f"plot: {plot_path}", highlight=False)
