"""Coordinator replicas: throughput with 1 vs 2 replicas, and failover under a bounded load.

Real processes on 127.0.0.1 with mTLS, started (and stopped by PID) here: two owners and two
coordinator replicas serving ONE head registry directory
(:class:`~jacfusion_fed.store.HeadRegistry` is safe across processes). The requester side
(this process) uses :func:`jacfusion_fed.rpc.channels.connect_coordinator` with both
addresses: one channel, gRPC's ``round_robin`` over the replicas and its ``retryPolicy`` for
UNAVAILABLE on the idempotent FusionService methods (:mod:`jacfusion_fed.rpc.channels`).

* **Throughput**: samples/s of batched ``Predict`` from ``clients`` threads, one replica
  against two, in alternating blocks (so load from other jobs affects both alike); the
  figure is the ratio ``two / one``.
* **Failover**: ``clients`` threads send ``failover_requests`` requests in all; once a third
  of them are answered, one replica is killed (SIGKILL, as in a crash). Every request that
  does not come back complete counts as failed. Run twice: with the retry policy (the
  target is 0 failures) and, as the baseline in the same run, with retries switched off.

``python -m jacfusion_fed.bench.replicas --out docs/results/replicas.json``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jacfusion_fed.bench.deployment import (
    MODALITIES,
    ServeBenchConfig,
    bench_setup,
    coordinator_serve_args,
    owner_serve_args,
    python_procs,
    wait_serving,
)
from jacfusion_fed.bench.serve import load_average, throughput
from jacfusion_fed.processes import ProcessSet

__all__ = ["ReplicaBenchConfig", "run_replica_bench"]


@dataclass(frozen=True)
class ReplicaBenchConfig:
    samples: int = 2048
    classes: int = 10
    batch: int = 256
    clients: int = 4
    block_s: float = 3.0
    blocks: int = 2
    failover_requests: int = 600
    failover_batch: int = 32
    seed: int = 0


def _start_owners(procs: ProcessSet, setup: Any) -> dict[str, str]:
    root, names = setup.root, []
    for modality in MODALITIES:
        name, port_file = f"owner-{modality}", setup.root / f"owner-{modality}.port"
        procs.start_serving(
            name,
            owner_serve_args(
                root / f"ws-{modality}",
                modality,
                setup.data[modality],
                setup.key_path,
                setup.certs.owner_dirs[f"{modality}-co"],
                port_file,
                epochs=2,
            ),
            port_file,
        )
        names.append((name, port_file, modality))
    return {m: f"127.0.0.1:{procs.wait_port(n, f)}" for n, f, m in names}


def _start_coordinator(procs: ProcessSet, setup: Any, name: str, owners: dict[str, str]) -> str:
    port_file = setup.root / f"{name}.port"
    procs.start_serving(
        name,
        coordinator_serve_args(
            setup.root / "registry", setup.certs.coordinator_dir, port_file, owners
        ),
        port_file,
    )
    return f"127.0.0.1:{procs.wait_port(name, port_file)}"


def _wait_all_heads(target: str, requester: Any, timeout: float = 120.0) -> None:
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc

    channel = connect_coordinator(target, requester)
    wait_serving(channel)
    stub = fusion_pb2_grpc.FusionServiceStub(channel)
    deadline = time.monotonic() + timeout
    while len(stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=10).modalities) < len(
        MODALITIES
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"coordinator {target} lacks heads after {timeout} s")
        time.sleep(0.2)
    channel.close()


def _caller(targets: list[str], requester: Any, retries: bool) -> Callable[[list[str]], Any]:
    """A Predict function on its own channel to ``targets`` (all replicas in one channel)."""
    from jacfusion_fed.privacy.certs import COORDINATOR_SERVER_NAME
    from jacfusion_fed.rpc.channels import connect_coordinator, replica_target
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
    from jacfusion_fed.rpc.tls import TransportOptions, create_channel

    if retries:
        channel = connect_coordinator(targets, requester)
    else:  # the baseline: the same balancing, no retry policy
        no_retry = TransportOptions(
            extra=(
                ("grpc.service_config", '{"loadBalancingConfig":[{"round_robin":{}}]}'),
                ("grpc.enable_retries", 0),
            )
        )
        channel = create_channel(
            replica_target(targets),
            requester,
            server_name=COORDINATOR_SERVER_NAME,
            options=no_retry,
        )
    stub = fusion_pb2_grpc.FusionServiceStub(channel)

    def call(batch_ids: list[str]) -> Any:
        resp = stub.Predict(fusion_pb2.PredictRequest(sample_ids=batch_ids), timeout=30)
        if len(resp.predictions.sample_ids) != len(batch_ids):
            raise RuntimeError("incomplete batch")
        return resp

    return call


def _failover(
    procs: ProcessSet,
    victim: str,
    targets: list[str],
    requester: Any,
    ids: list[str],
    cfg: ReplicaBenchConfig,
    retries: bool,
) -> dict[str, Any]:
    """``cfg.failover_requests`` requests from ``cfg.clients`` threads; SIGKILL ``victim``
    once a third are answered. Bounded: each thread sends its share and stops."""
    import grpc

    per_client = cfg.failover_requests // cfg.clients
    done, failed = [0] * cfg.clients, [0] * cfg.clients
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        call = _caller(targets, requester, retries)
        for j in range(per_client):
            start = ((i * per_client + j) * cfg.failover_batch) % (len(ids) - cfg.failover_batch)
            try:
                call(ids[start : start + cfg.failover_batch])
                done[i] += 1
            except (grpc.RpcError, RuntimeError) as exc:
                failed[i] += 1
                code = exc.code().name if isinstance(exc, grpc.RpcError) else "INCOMPLETE"
                with lock:
                    codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(cfg.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while sum(done) + sum(failed) < per_client * cfg.clients // 3:
        if time.monotonic() > deadline or not any(t.is_alive() for t in threads):
            break
        time.sleep(0.005)
    procs.kill(victim)  # SIGKILL, a crash: no graceful shutdown
    killed_after = sum(done) + sum(failed)
    for t in threads:
        t.join(300)
    return {
        "retries": retries,
        "requests": per_client * cfg.clients,
        "answered_before_kill": killed_after,
        "succeeded": sum(done),
        "failed": sum(failed),
        "failed_by_code": codes,
        "seconds": time.perf_counter() - t0,
    }


def run_replica_bench(
    cfg: ReplicaBenchConfig,
    *,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run both measurements; the results as a JSON-ready dict (see the module docstring)."""
    data_cfg = ServeBenchConfig(samples=cfg.samples, classes=cfg.classes, seed=cfg.seed)
    with bench_setup(workdir, data_cfg, "bench", progress) as setup:
        procs = python_procs(setup.root)
        try:
            progress("two owners (training if needed) and two coordinator replicas")
            owners = _start_owners(procs, setup)
            a = _start_coordinator(procs, setup, "coordinator-a", owners)
            b = _start_coordinator(procs, setup, "coordinator-b", owners)
            for target in (a, b):
                _wait_all_heads(target, setup.requester)
            blocks: dict[str, list[dict[str, float]]] = {"one": [], "two": []}
            for k in range(cfg.blocks):
                for label, targets in (("one", [a]), ("two", [a, b])):
                    progress(f"throughput block {k + 1}/{cfg.blocks}: {label} replica(s)")
                    make = functools.partial(_caller, targets, setup.requester, True)
                    blocks[label].append(
                        throughput(make, setup.ids, cfg.batch, cfg.clients, cfg.block_s)
                    )
            rate = {k: sum(b["samples_per_s"] for b in v) / len(v) for k, v in blocks.items()}
            failover = []
            for retries in (True, False):
                progress(f"failover, retries {'on' if retries else 'off'}: kill coordinator-b")
                failover.append(
                    _failover(
                        procs, "coordinator-b", [a, b], setup.requester, setup.ids, cfg, retries
                    )
                )
                if not retries:
                    break
                b = _start_coordinator(procs, setup, "coordinator-b", owners)
                _wait_all_heads(b, setup.requester)
        finally:
            procs.stop_all()
    return {
        "config": asdict(cfg),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "throughput": {
            "one_replica_samples_per_s": rate["one"],
            "two_replicas_samples_per_s": rate["two"],
            "ratio_two_vs_one": rate["two"] / rate["one"],
            "blocks": blocks,
        },
        "failover": {
            "with_retries": failover[0],
            "without_retries": failover[1] if len(failover) > 1 else None,
        },
    }


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-replicas.json"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes (tests)")
    args = parser.parse_args(argv)
    cfg = ReplicaBenchConfig()
    if args.quick:
        cfg = ReplicaBenchConfig(
            samples=1024, batch=128, clients=2, block_s=1.5, blocks=1, failover_requests=200
        )
    results = run_replica_bench(cfg, workdir=args.workdir, progress=lambda m: print(m, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("throughput", "failover")}, indent=2))


if __name__ == "__main__":
    _main()
