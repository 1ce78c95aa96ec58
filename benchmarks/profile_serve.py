"""Where the online path spends its CPU: py-spy samples the coordinator and one owner while
``bench serve``'s throughput load runs (batches of 1024 from two requester threads, the owners
answering from their logit cache), at each K asked for.

Run:  python benchmarks/profile_serve.py --ks 10,100 --out docs/results/profile-serve.json

py-spy (``pip install -e '.[profile]'``) samples every Python thread of a process (cProfile
sees only the thread that enabled it, and gRPC serves on a pool of threads); idle threads are not
counted, so the shares are of the samples where a thread was running Python code (gRPC's C
core is counted at the Python frame that called into it). Per process the JSON has the top
functions by self samples (the function itself was running) and by cumulative samples (the
function was on the stack), and the project's own functions by cumulative samples, as shares
of all samples.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jacfusion_fed.bench.deployment import (
    MODALITIES,
    ServeBenchConfig,
    bench_setup,
    python_procs,
    start_deployment,
    wait_serving,
)
from jacfusion_fed.bench.serve import load_average, throughput

ROOT = Path(__file__).resolve().parents[1]
_PROJECT = ("jacfusion_fed/", "server/", "clients/")


def _frame(raw: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file path relative to the repo or site)``."""
    name, _, where = raw.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for anchor in (str(ROOT) + "/", "site-packages/", "lib/python"):
        if anchor in path:
            path = path.split(anchor, 1)[1]
            break
    return f"{name} ({path})"


def summarize(raw_file: Path, top: int) -> dict[str, Any]:
    """Top ``top`` functions by self and cumulative samples of a py-spy ``--format raw`` file."""
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("thread ")]
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            cumulative[f] += count

    def rows(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": c, "share": round(c / total, 4)}
            for f, c in counter.most_common(top)
        ]

    project = collections.Counter(
        {f: c for f, c in cumulative.items() if f.split(" (", 1)[1].startswith(_PROJECT)}
    )
    return {
        "samples": total,
        "self": rows(own),
        "cumulative": rows(cumulative),
        "project_cumulative": rows(project),
    }


def _predict_caller(target: str, requester: Any, method: str) -> Any:
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.fusion_codec import PredictOptions, options_to_proto
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc

    options = options_to_proto(PredictOptions(method=method))

    def make_call() -> Any:
        stub = fusion_pb2_grpc.FusionServiceStub(connect_coordinator(target, requester))

        def call(batch_ids: list[str]) -> Any:
            resp = stub.Predict(
                fusion_pb2.PredictRequest(sample_ids=batch_ids, options=options), timeout=60
            )
            if len(resp.predictions.sample_ids) != len(batch_ids):
                raise RuntimeError("incomplete batch")
            return resp

        return call

    return make_call


def profile_k(classes: int, seconds: float, rate: int, top: int, py_spy: str) -> dict[str, Any]:
    cfg = ServeBenchConfig(classes=classes, uncached=False)
    with bench_setup(None, cfg, "bench-requester", print) as setup:
        procs = python_procs(setup.root)
        try:
            with start_deployment(
                procs, setup.root, setup.certs, setup.data, setup.key_path, "prof", cached=True
            ) as targets:
                from jacfusion_fed.rpc.channels import connect_coordinator
                from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc

                channel = connect_coordinator(targets["coordinator"], setup.requester)
                wait_serving(channel)
                stub = fusion_pb2_grpc.FusionServiceStub(channel)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=10)
                    if len(info.modalities) == len(MODALITIES):
                        break
                    time.sleep(0.2)
                make_call = _predict_caller(targets["coordinator"], setup.requester, cfg.method)
                for _ in range(5):  # warm-up (logit caches, code paths)
                    make_call()(random.sample(setup.ids, cfg.batch))
                pids = {
                    "coordinator": procs.procs["prof-coordinator"].pid,
                    "owner": procs.procs[f"prof-owner-{MODALITIES[0]}"].pid,
                }
                raws = {name: setup.root / f"{name}.raw" for name in pids}
                spies = [
                    subprocess.Popen(
                        [
                            py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                            "--rate", str(rate), "--format", "raw", "--nonblocking",
                            "--output", str(raws[name]),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for name, pid in pids.items()
                ]  # fmt: skip
                thr = throughput(make_call, setup.ids, cfg.batch, cfg.clients, seconds)
                for spy in spies:
                    spy.wait(60)
                profiles = {name: summarize(raw, top) for name, raw in raws.items()}
                channel.close()
        finally:
            procs.stop_all()
    return {"classes": classes, "throughput": thr, "profiles": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="10,100", help="comma-separated K values")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds profiled per K")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed per ranking")
    parser.add_argument("--out", type=Path, default=Path("profile-serve.json"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found: pip install -e '.[profile]'")
    import grpc
    import torch

    env = {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "os": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_average(),
    }
    runs = [
        profile_k(int(k), args.seconds, args.rate, args.top, py_spy) for k in args.ks.split(",")
    ]
    env["load_avg_after"] = load_average()
    payload = {
        "what": "py-spy samples of the coordinator and one owner during bench serve's "
        "throughput load (batches of 1024, 2 requester threads, logit cache on)",
        "environment": env,
        "runs": runs,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for run in runs:
        print(f"K={run['classes']}: {run['throughput']['samples_per_s']:,.0f} samples/s")
        for name, prof in run["profiles"].items():
            print(f"  {name} ({prof['samples']} samples), top self:")
            for row in prof["self"][:8]:
                print(f"    {100 * row['share']:5.1f}%  {row['function']}")
            print(f"  {name}, top cumulative:")
            for row in prof["cumulative"][:8]:
                print(f"    {100 * row['share']:5.1f}%  {row['function']}")


if __name__ == "__main__":
    main()
