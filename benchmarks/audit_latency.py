"""Added latency of the audit log per Predict: three deployments in one process (two owners
and a coordinator each, mTLS on loopback, the same trained workspaces), without an audit log,
with audit logs synced per entry (``fsync="entry"``, the services' default: ``fdatasync``
before each response) and synced only at checkpoints (``fsync="checkpoint"``). Requests of one
pseudonym go to the three in turn, in alternating blocks, so load drifts hit all alike. Each
audited Predict writes three entries: one per owner (GetLogits) and the coordinator's.

Run:  python benchmarks/audit_latency.py --out docs/results/audit-latency.json [--dir DIR]
      (--dir: where the logs are written; its file system decides what fsync costs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

VARIANTS = ("none", "entry", "checkpoint")


def _fs_type(path: Path) -> str:
    """The file system type of ``path``'s mount (from /proc/mounts), e.g. ext4, overlay."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if (
                len(parts) > 2
                and str(path.resolve()).startswith(parts[1])
                and len(parts[1]) > len(best)
            ):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def _block_interval(
    latencies: dict[str, list[float]], block: int, variant: str, rounds: int = 2000
) -> list[float]:
    """95% interval of p50(variant) - p50(none) by a paired block bootstrap: whole blocks
    are resampled, the same block indices for both variants (they ran back to back)."""
    import random

    rng = random.Random(0)
    blocks = len(latencies["none"]) // block

    def cut(v: str) -> list[list[float]]:
        return [latencies[v][i * block : (i + 1) * block] for i in range(blocks)]

    base, other = cut("none"), cut(variant)
    diffs = []
    for _ in range(rounds):
        pick = [rng.randrange(blocks) for _ in range(blocks)]
        a = [x for i in pick for x in other[i]]
        b = [x for i in pick for x in base[i]]
        diffs.append(statistics.median(a) - statistics.median(b))
    diffs.sort()
    return [diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(root: Path, requests: int, block: int) -> dict[str, Any]:
    import grpc

    from jacfusion_fed.audit import AuditLog, Signer
    from jacfusion_fed.bench.deployment import MODALITIES, ServeBenchConfig, make_dataset
    from jacfusion_fed.clients.serve import serve_owner
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.certs import generate_deployment_certs
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
    from jacfusion_fed.rpc.tls import TlsFiles
    from jacfusion_fed.server.coordinator import Coordinator
    from jacfusion_fed.server.predict_types import OwnerEndpoint
    from jacfusion_fed.server.serve import serve_coordinator

    owners = {m: f"{m}-co" for m in MODALITIES}
    certs = generate_deployment_certs(root / "certs", {v: k for k, v in owners.items()}, ["c"])
    key = write_key(root / "pseudonym.key", generate_key())
    pz = Pseudonymizer.from_file(key)
    data = make_dataset(root, ServeBenchConfig(samples=240, classes=4, features=8))
    for m in MODALITIES:  # train once; every deployment serves these workspaces
        OwnerWorkspace(root / f"ws-{m}", m, f"npz:{data[m]}", pz).train(epochs=1, seed=0)
    ids = pz.many([f"patient-{i:07d}" for i in range(200)])

    def audit(variant: str, name: str, tls_dir: Path, service: dict[str, str]) -> Any:
        if variant == "none":
            return None
        signer = Signer.from_files(tls_dir / "cert.pem", tls_dir / "key.pem")
        path = root / "audit" / variant / f"{name}.jsonl"
        return AuditLog(path, service=service, signer=signer, fsync=variant).start()  # type: ignore[arg-type]

    stubs: dict[str, Any] = {}
    with ExitStack() as stack:
        for variant in VARIANTS:
            endpoints = []
            for m, owner in owners.items():
                tls_dir = certs.owner_dirs[owner]
                ws = OwnerWorkspace(root / f"ws-{m}", m, f"npz:{data[m]}", pz)
                log = audit(variant, owner, tls_dir, {"role": "owner", "name": owner})
                server = serve_owner(ws, TlsFiles.from_dir(tls_dir), audit=log)
                stack.callback(server.stop, 0)
                endpoints.append(OwnerEndpoint(m, server.target))
            tls = TlsFiles.from_dir(certs.coordinator_dir)
            log = audit(variant, "coordinator", certs.coordinator_dir, {"role": "coordinator"})
            coordinator = Coordinator(root / f"registry-{variant}", endpoints, tls)
            fusion = serve_coordinator(coordinator, tls, audit=log)
            stack.callback(fusion.stop, 0)
            channel = connect_coordinator(
                fusion.target, TlsFiles.from_dir(certs.requester_dirs["c"])
            )
            stubs[variant] = fusion_pb2_grpc.FusionServiceStub(channel)
        for stub in stubs.values():  # registered heads, warm caches and channels
            deadline = time.monotonic() + 60
            while True:
                try:
                    for sid in ids:
                        stub.Predict(fusion_pb2.PredictRequest(sample_ids=[sid]), timeout=10)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        load_before = os.getloadavg()
        latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
        done = 0
        while done < requests:
            for variant in VARIANTS:
                stub = stubs[variant]
                for i in range(block):
                    request = fusion_pb2.PredictRequest(sample_ids=[ids[(done + i) % len(ids)]])
                    t0 = time.perf_counter()
                    stub.Predict(request, timeout=10)
                    latencies[variant].append(1000 * (time.perf_counter() - t0))
            done += block
        load_after = os.getloadavg()
    summary = {
        v: {
            "p50_ms": statistics.median(ms),
            "p99_ms": _pct(ms, 0.99),
            "mean_ms": statistics.fmean(ms),
            "requests": len(ms),
        }
        for v, ms in latencies.items()
    }
    base = summary["none"]["p50_ms"]
    return {
        "what": "Predict latency (1 id, K=4, two owners, mTLS, loopback) without audit and with "
        "audit logs on the coordinator and both owners",
        "variants": summary,
        "added_p50_ms": {v: summary[v]["p50_ms"] - base for v in VARIANTS[1:]},
        "added_p50_ms_ci95": {v: _block_interval(latencies, block, v) for v in VARIANTS[1:]},
        "ratio_p50": {v: summary[v]["p50_ms"] / base for v in VARIANTS[1:]},
        "block": block,
        "log_dir_fs": _fs_type(root),
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
        },
        "command": "python benchmarks/audit_latency.py --out docs/results/audit-latency.json",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the logs")
    parser.add_argument("--requests", type=int, default=600, help="Predicts per variant")
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="audit-latency-") as tmp:
        results = measure(Path(tmp), args.requests, args.block)
    from jacfusion_fed.atomicio import atomic_write_bytes

    atomic_write_bytes(args.out, (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    for v, s in results["variants"].items():
        print(f"{v:>10}: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
