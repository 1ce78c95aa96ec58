"""What tracing costs a Predict: the same loopback deployment (two owners, a coordinator, a
requester, plain text, all in one process) with tracing off and with ``--trace-file``'s
exporter on (every span of requester, coordinator and owners written as OTLP JSON lines).

Each mode runs in a fresh process (OpenTelemetry's tracer provider is set once per process);
the modes alternate ``rounds`` times so that load changes on a shared machine hit both. The
figures are per-request latencies of 1-id Predicts (after a warm-up), p50 and p99 in ms; the
load average is recorded before and after.

Run:  python benchmarks/tracing_overhead.py --out docs/results/tracing-overhead.json
      (about a minute on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("off", "trace-file")


def _worker(mode: str, requests: int, root: Path) -> dict[str, Any]:
    import numpy as np

    from jacfusion_fed.bench.deployment import MODALITIES, ServeBenchConfig, make_dataset
    from jacfusion_fed.clients.serve import serve_owner
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key
    from jacfusion_fed.requester import Requester
    from jacfusion_fed.rpc import tracing
    from jacfusion_fed.rpc.tls import INSECURE
    from jacfusion_fed.server.coordinator import Coordinator
    from jacfusion_fed.server.predict_types import OwnerEndpoint
    from jacfusion_fed.server.serve import serve_coordinator

    trace_file = root / "spans.jsonl" if mode == "trace-file" else None
    assert tracing.configure("bench", trace_file, environ={}) == (trace_file is not None)
    data = make_dataset(root, ServeBenchConfig(samples=64, classes=4, features=8))
    pz = Pseudonymizer(generate_key())
    owners = {}
    for m in MODALITIES:
        ws = OwnerWorkspace(root / f"ws-{m}", m, f"npz:{data[m]}", pz)
        ws.train(epochs=1, seed=0)
        owners[m] = serve_owner(ws, INSECURE)
    coordinator = Coordinator(
        root / "registry", [OwnerEndpoint(m, s.target) for m, s in owners.items()], INSECURE
    )
    server = serve_coordinator(coordinator, INSECURE)
    ids = [f"patient-{i:07d}" for i in range(32)]
    latencies = []
    with Requester(server.target, tls=INSECURE, pseudonym_key=pz) as req:
        deadline = time.monotonic() + 60
        while True:  # the coordinator registers the owners' heads in the background
            try:
                req.predict(ids[:1])
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for i in range(50):
            req.predict([ids[i % len(ids)]])
        for i in range(requests):
            t0 = time.perf_counter()
            req.predict([ids[i % len(ids)]])
            latencies.append((time.perf_counter() - t0) * 1e3)
    server.stop(0)
    for owner in owners.values():
        owner.stop(0)
    tracing.shutdown()
    spans = 0
    if trace_file is not None:
        spans = sum(
            len(s["spans"])
            for line in trace_file.read_text().splitlines()
            for r in json.loads(line)["resourceSpans"]
            for s in r["scopeSpans"]
        )
    arr = np.asarray(latencies)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "requests": requests,
        "spans_written": spans,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _worker(args.worker, args.requests, args.root)
        args.out.write_text(json.dumps(result))
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in MODES:
                root = Path(tmp) / f"{mode}-{r}"
                root.mkdir()
                out = root / "result.json"
                env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                subprocess.run(
                    [
                        *(sys.executable, __file__, "--worker", mode, "--root", str(root)),
                        *("--requests", str(args.requests), "--out", str(out)),
                    ],
                    check=True,
                    env=env,
                )
                runs[mode].append(json.loads(out.read_text()))
                print(mode, runs[mode][-1], flush=True)
    summary = {
        mode: {
            "p50_ms_median_of_rounds": statistics.median(x["p50_ms"] for x in results),
            "p99_ms_median_of_rounds": statistics.median(x["p99_ms"] for x in results),
        }
        for mode, results in runs.items()
    }
    off, on = summary["off"], summary["trace-file"]
    payload = {
        "what": "1-id Predict latency, two owners + coordinator + requester in one process, "
        "plain text on loopback; tracing off vs. --trace-file's exporter (every span written)",
        "command": "python benchmarks/tracing_overhead.py --out docs/results/tracing-overhead.json",
        "runs": runs,
        "summary": summary,
        "p50_added_ms": on["p50_ms_median_of_rounds"] - off["p50_ms_median_of_rounds"],
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "measured on a shared 2-core machine under other jobs' load (see loadavg); "
        "a rough figure, rerun on a quiet machine before quoting it",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
