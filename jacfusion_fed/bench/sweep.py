"""``jacfusion-fed bench sweep``: ``bench serve``'s two figures over K and the number of owners,
in one run, one JSON and one plot.

For each K (default 10, 100, 1000) one synthetic dataset with as many modalities as the most
owners asked for (default 2, 4, 8; see :func:`~jacfusion_fed.bench.deployment.modality_names`)
is made, and that many owners start once, answering from their logit cache. Then, for each
owner count N, a coordinator of the first N owners starts and :func:`~.serve.measure` takes,
against the bare gRPC echo server (the coordinator's TLS and thread settings) of the same run:

* the p50 of a single-sample ``Predict`` over two sequential echo round trips (interleaved
  blocks, so that load from other jobs affects both alike), and
* the throughput of ``Predict`` with batches of ``batch`` ids from ``clients`` requester
  threads (samples/s).

Every row records the load average when it was measured. The targets of issue 24 are checked
from the measured figures (:func:`sweep_targets`): at K=10 p50 <= 2.2x two echo round trips and
>= 250,000 samples/s, at K=100 <= 3x and >= 60,000 samples/s (both with the fewest owners of
the sweep, 2 by default), and with the most owners at least half the throughput of the fewest,
per K. A point that fails (an owner that does not answer in time, say) is recorded with its
error instead of figures, and the sweep goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from jacfusion_fed.bench.deployment import (
    ServeBenchConfig,
    bench_setup,
    python_procs,
    start_coordinator,
    start_owners,
)
from jacfusion_fed.bench.serve import environment, load_average, measure, start_echo

__all__ = [
    "OWNER_SCALING_TARGET",
    "SWEEP_TARGETS",
    "SweepConfig",
    "measured_rows",
    "plot_sweep",
    "run_sweep",
    "sweep_targets",
]

#: K -> (largest p50 over two echo round trips, smallest samples/s), with the fewest owners.
SWEEP_TARGETS: dict[int, tuple[float, float]] = {10: (2.2, 250_000), 100: (3.0, 60_000)}
#: Throughput with the most owners over that with the fewest, per K: at least this.
OWNER_SCALING_TARGET = 0.5


@dataclass(frozen=True)
class SweepConfig:
    ks: tuple[int, ...] = (10, 100, 1000)
    owners: tuple[int, ...] = (2, 4, 8)
    samples: int = 4096
    features: int = 32
    batch: int = 1024
    latency_requests: int = 400
    block: int = 50
    duration_s: float = 3.0
    clients: int = 2
    method: str = "jacobian"
    epochs: int = 3
    seed: int = 0


def run_sweep(
    cfg: SweepConfig,
    *,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run the sweep (see the module docstring); returns the results as a JSON-able dict."""
    if not cfg.ks or not cfg.owners:
        raise ValueError("the sweep needs at least one K and one owner count")
    if cfg.samples < cfg.batch:
        raise ValueError(f"samples ({cfg.samples}) must be >= batch ({cfg.batch})")
    results: dict[str, Any] = {"config": asdict(cfg), "environment": environment(), "rows": []}
    started = time.monotonic()
    most = max(cfg.owners)
    for k in cfg.ks:
        serve_cfg = ServeBenchConfig(
            samples=cfg.samples,
            classes=k,
            features=cfg.features,
            batch=cfg.batch,
            latency_requests=cfg.latency_requests,
            duration_s=cfg.duration_s,
            clients=cfg.clients,
            method=cfg.method,
            uncached=False,
            epochs=cfg.epochs,
            seed=cfg.seed,
            block=cfg.block,
            owners=most,
        )
        where = None if workdir is None else workdir / f"k{k}"
        with bench_setup(where, serve_cfg, "bench-requester", progress) as setup:
            procs = python_procs(setup.root)
            try:
                echo = start_echo(procs, setup.root, setup.certs.coordinator_dir)
                progress(f"K={k}: starting {most} owners (training on first start)")
                with start_owners(
                    procs, setup.root, setup.certs, setup.data, setup.key_path, f"k{k}", cached=True
                ) as owner_targets:
                    for n in cfg.owners:
                        subset = dict(list(owner_targets.items())[:n])
                        progress(f"K={k}, {n} owners: starting the coordinator")
                        load_before = load_average()
                        try:
                            with start_coordinator(
                                procs, setup.root, setup.certs, f"k{k}-owners{n}", subset
                            ) as coordinator:
                                measured = measure(
                                    replace(serve_cfg, owners=n),
                                    {"owners": subset, "coordinator": coordinator},
                                    echo,
                                    setup.requester,
                                    setup.ids,
                                    progress,
                                )
                        except Exception as exc:  # one point failed: say so, measure the rest
                            progress(f"K={k}, {n} owners failed: {exc}")
                            measured = {"error": f"{type(exc).__name__}: {exc}"}
                        results["rows"].append(
                            {
                                "classes": k,
                                "owners": n,
                                **measured,
                                "load_avg_before": load_before,
                                "load_avg_after": load_average(),
                            }
                        )
            finally:
                procs.stop_all()
    results["environment"]["load_avg_after"] = load_average()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = sweep_targets(measured_rows(results))
    return results


def _row(rows: list[dict[str, Any]], k: int, owners: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["classes"] == k and r["owners"] == owners), None)


def measured_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows that were measured (a failed point has an ``error`` instead)."""
    return [r for r in results["rows"] if "error" not in r]


def sweep_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target the sweep's rows can check: what, where, target, measured, met."""
    if not rows:
        return []
    fewest = min(r["owners"] for r in rows)
    most = max(r["owners"] for r in rows)
    out: list[dict[str, Any]] = []
    for k, (ratio_target, rate_target) in SWEEP_TARGETS.items():
        row = _row(rows, k, fewest)
        if row is None:
            continue
        ratio = row["latency"]["p50_ratio_vs_two_echo"]
        rate = row["throughput"]["samples_per_s"]
        out.append(
            {
                "what": "p50_ratio_vs_two_echo",
                "classes": k,
                "owners": fewest,
                "target": ratio_target,
                "measured": ratio,
                "met": ratio <= ratio_target,
            }
        )
        out.append(
            {
                "what": "samples_per_s",
                "classes": k,
                "owners": fewest,
                "target": rate_target,
                "measured": rate,
                "met": rate >= rate_target,
            }
        )
    if most > fewest:
        for k in sorted({r["classes"] for r in rows}):
            low, high = _row(rows, k, fewest), _row(rows, k, most)
            if low is None or high is None:
                continue
            scaling = high["throughput"]["samples_per_s"] / low["throughput"]["samples_per_s"]
            out.append(
                {
                    "what": f"samples_per_s_{most}_over_{fewest}_owners",
                    "classes": k,
                    "owners": most,
                    "target": OWNER_SCALING_TARGET,
                    "measured": scaling,
                    "met": scaling >= OWNER_SCALING_TARGET,
                }
            )
    return out


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """p50 ratio and throughput against K, one line per owner count (PNG or SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measured_rows(results)
    ks = sorted({r["classes"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["owners"] for r in rows}):
        mine = sorted((r for r in rows if r["owners"] == n), key=lambda r: r["classes"])
        x = [r["classes"] for r in mine]
        left.plot(
            x, [r["latency"]["p50_ratio_vs_two_echo"] for r in mine], "o-", label=f"{n} owners"
        )
        right.plot(x, [r["throughput"]["samples_per_s"] for r in mine], "o-", label=f"{n} owners")
    for k, (ratio_target, rate_target) in SWEEP_TARGETS.items():
        if k in ks:
            left.plot([k], [ratio_target], "k_", markersize=18, mew=2)
            right.plot([k], [rate_target], "k_", markersize=18, mew=2)
    left.plot([], [], "k_", markersize=10, mew=2, label="target")
    left.set(
        xscale="log",
        xlabel="K (classes)",
        ylabel="p50 Predict / two echo round trips",
        title="latency, 1 sample",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="K (classes)",
        ylabel="samples/s",
        title=f"throughput, batches of {results['config']['batch']}, logit cache on",
    )
    for ax in (left, right):
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.grid(True, which="both", alpha=0.3)
    left.legend()
    env = results["environment"]
    fig.suptitle(
        f"bench sweep: {env['cpu_count']} CPUs, load average {env['load_avg_before']} before, "
        f"{env.get('load_avg_after')} after",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
