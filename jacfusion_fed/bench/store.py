"""``jacfusion-fed bench store``: the owner's record store, from the store to the CLI.

Records of ``features`` float32 values (76 by default), batches of ``batch`` (1,024):

* **direct**: :meth:`RecordStore.put` into a fresh SQLite store, ``records`` records; the
  baseline in the same run is the old one-file-per-record layout's write path (one verified
  envelope file per record, as that store wrote them) on ``baseline_records`` records;
* **disk**: bytes on disk (allocated blocks of the database, its WAL and -shm) per record at
  each of ``sizes`` records, against the payload (``features`` x 4 bytes); the largest size is
  also the "ingest N records" time;
* **services** (an ``owner serve`` process, mTLS on loopback): ``Requester.submit`` of
  ``records`` records (pseudonymized here, batched by
  :func:`jacfusion_fed.rpc.record_batches.put_in_batches`); ``jacfusion-fed submit`` of one
  ``.npz`` file of ``submit_records`` records, timed from the command's start to its exit;
  ``GetLogits`` of 1,024 cached ids as the coordinator calls it (p50/p95), with a ``GetInfo``
  round trip on the same channel as the baseline, and the store's own cached-logit read.

The load average before and after is recorded: on a shared machine the figures move with it.
``jacfusion-fed bench store --sizes 10000,1000000 --out docs/results/bench-store.json`` wrote
the committed figures.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.bench.deployment import CLI_ENTRY, owner_serve_args, python_procs
from jacfusion_fed.bench.serve import load_average
from jacfusion_fed.store.atomic import write_verified
from jacfusion_fed.store.record_store import RecordStore, content_hash

__all__ = ["TARGETS", "StoreBenchConfig", "print_results", "run_store_bench", "summary_rows"]

#: The issue's targets (2 cores).
TARGETS = {
    "direct_records_per_s": 50_000,
    "grpc_records_per_s": 20_000,
    "ingest_1m_seconds": 60.0,
    "submit_cli_records_per_s": 20_000,
    "disk_ratio": 1.5,
    "get_logits_p50_ms": 5.0,
}
_MODALITY = "vec"


@dataclass(frozen=True)
class StoreBenchConfig:
    records: int = 100_000
    batch: int = 1024
    features: int = 76
    classes: int = 10
    sizes: tuple[int, ...] = (10_000,)
    baseline_records: int = 2_000
    submit_records: int = 100_000
    services: bool = True
    logit_ids: int = 1024
    logit_calls: int = 200
    seed: int = 0


def _rows(rng: np.random.Generator, n: int, features: int) -> np.ndarray:
    return rng.random((n, features), dtype=np.float32)


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    return [bytes(row).hex() for row in rng.integers(0, 256, (n, 32), dtype=np.uint8)]


def _disk_bytes(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {
        "allocated": sum(p.stat().st_blocks * 512 for p in files),
        "apparent": sum(p.stat().st_size for p in files),
    }


def _direct(root: Path, n: int, cfg: StoreBenchConfig, seed: int) -> dict[str, Any]:
    """``n`` records into a fresh store, timed around ``put`` only (data made outside)."""
    rng = np.random.default_rng(seed)
    store = RecordStore(root, "0" * 16)
    seconds = cpu = 0.0
    for start in range(0, n, cfg.batch):
        m = min(cfg.batch, n - start)
        ids, x = _ids(rng, m), _rows(rng, m, cfg.features)
        t0, c0 = time.perf_counter(), time.process_time()
        store.put(ids, x)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
    store.close()
    return _sized(root, n, cfg, seconds, cpu)


def _sized(root: Path, n: int, cfg: StoreBenchConfig, seconds: float, cpu: float) -> dict[str, Any]:
    """Rates and disk use; ``cpu``: CPU seconds of this process in the timed calls (on a shared
    machine the wall-clock rate also counts the time other jobs held the cores)."""
    disk = _disk_bytes(root)
    payload = cfg.features * 4
    return {
        "records": n,
        "batch": cfg.batch,
        "seconds": round(seconds, 3),
        "records_per_s": round(n / seconds, 1),
        "cpu_seconds": round(cpu, 3),
        "records_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        "disk_bytes_allocated": disk["allocated"],
        "disk_bytes_apparent": disk["apparent"],
        "bytes_per_record": round(disk["allocated"] / n, 1),
        "payload_bytes_per_record": payload,
        "disk_ratio": round(disk["allocated"] / (n * payload), 3),
    }


def _old_layout(root: Path, n: int, cfg: StoreBenchConfig, seed: int) -> dict[str, Any]:
    """The write path of the old one-file-per-record store (one verified file per record)."""
    rng = np.random.default_rng(seed)
    (root / "records").mkdir(parents=True)
    seconds = cpu = 0.0
    for start in range(0, n, cfg.batch):
        m = min(cfg.batch, n - start)
        ids, x = _ids(rng, m), _rows(rng, m, cfg.features)
        t0, c0 = time.perf_counter(), time.process_time()
        for sid, row in zip(ids, x, strict=True):
            meta: dict[str, object] = {"kind": "record", "id": sid, "dtype": "<f4"}
            meta |= {"shape": [cfg.features], "sha256": content_hash(row)}
            meta |= {"stored_at": time.time(), "expires_at": None}
            write_verified(root / "records" / f"{sid}.rec", row.tobytes(), meta)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return _sized(root, n, cfg, seconds, cpu)


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p95_ms": round(float(np.percentile(arr, 95)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "calls": len(samples),
    }


def _owner_data(path: Path, cfg: StoreBenchConfig) -> None:
    rng = np.random.default_rng(cfg.seed)
    n = 512
    labels = rng.integers(0, cfg.classes, n)
    arrays = {
        "x_train": _rows(rng, n, cfg.features),
        "y_train": labels,
        "ids_train": np.array([f"train-{i:05d}" for i in range(n)]),
    }
    np.savez(path, **arrays)  # type: ignore[arg-type]


@contextlib.contextmanager
def _owner(root: Path, cfg: StoreBenchConfig) -> Iterator[dict[str, Any]]:
    """An ``owner serve`` process (mTLS, loopback) with a records-capable model; stopped."""
    from jacfusion_fed.privacy.certs import generate_deployment_certs
    from jacfusion_fed.privacy.pseudonyms import generate_key, write_key

    certs = generate_deployment_certs(root / "certs", {f"{_MODALITY}-co": _MODALITY}, ["bench"])
    key = write_key(root / "pseudonym.key", generate_key())
    _owner_data(root / "vec.npz", cfg)
    port_file = root / "owner.port"
    procs = python_procs(root / "logs")
    tls_dir = certs.owner_dirs[f"{_MODALITY}-co"]
    args = owner_serve_args(
        root / "ws", _MODALITY, root / "vec.npz", key, tls_dir, port_file, epochs=1
    )
    try:
        procs.start_serving("owner", args, port_file)
        target = f"127.0.0.1:{procs.wait_port('owner', port_file)}"
        yield {"target": target, "certs": certs, "key": key, "workspace": root / "ws"}
    finally:
        procs.stop_all()


def _services(root: Path, cfg: StoreBenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    from jacfusion_fed.requester import Requester
    from jacfusion_fed.rpc.auth import connect_owner
    from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
    from jacfusion_fed.rpc.tls import TlsFiles

    rng = np.random.default_rng(cfg.seed + 7)
    out: dict[str, Any] = {}
    progress("starting an owner process (trains a small model first)")
    with _owner(root, cfg) as owner:
        local = [f"live-{i:07d}" for i in range(cfg.records)]
        x = _rows(rng, cfg.records, cfg.features)
        tls = owner["certs"].requester_dirs["bench"]
        progress(f"Requester.submit of {cfg.records} records over mTLS")
        with Requester(
            owners={_MODALITY: owner["target"]}, tls=tls, pseudonym_key=owner["key"]
        ) as r:
            t0 = time.perf_counter()
            done = r.submit(_MODALITY, local, x, batch_size=cfg.batch, progress=False)
            seconds = time.perf_counter() - t0
            pseudonyms = r.pseudonyms(local[: cfg.logit_ids])
        out["grpc_mtls"] = {
            "records": cfg.records,
            "batch": cfg.batch,
            "batches": done.batches,
            "stored": done.stored,
            "seconds": round(seconds, 3),
            "records_per_s": round(cfg.records / seconds, 1),
        }
        if cfg.submit_records:
            progress(f"jacfusion-fed submit of one {cfg.submit_records}-record file")
            out["submit_cli"] = _submit_cli(root, cfg, owner, rng)
        progress(f"GetLogits of {cfg.logit_ids} cached ids")
        channel = connect_owner(
            owner["target"], TlsFiles.from_dir(owner["certs"].coordinator_dir), _MODALITY
        )
        stub = modality_pb2_grpc.ModalityServiceStub(channel)
        request = modality_pb2.GetLogitsRequest(sample_ids=pseudonyms)
        version = stub.GetLogits(request, timeout=60).model_version  # computes and caches
        out["get_logits"] = _timed(lambda: stub.GetLogits(request, timeout=30), cfg.logit_calls)
        info = modality_pb2.GetInfoRequest()
        out["get_info_round_trip"] = _timed(lambda: stub.GetInfo(info, timeout=30), cfg.logit_calls)
        out["get_logits"]["ids"] = cfg.logit_ids
        channel.close()
    store = RecordStore(owner["workspace"] / "live", _fingerprint(owner["key"]))
    out["get_logits_store"] = _timed(
        lambda: store.cached_logits_many(version, pseudonyms), cfg.logit_calls
    )
    out["get_logits_store"]["ids"] = cfg.logit_ids
    store.close()
    return out


def _fingerprint(key: Path) -> str:
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

    return Pseudonymizer.from_file(key).fingerprint


def _timed(call: Callable[[], Any], n: int) -> dict[str, float]:
    call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def _submit_cli(
    root: Path, cfg: StoreBenchConfig, owner: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    n = cfg.submit_records
    path = root / "export.npz"
    ids = np.array([f"file-{i:07d}" for i in range(n)])
    np.savez(path, ids=ids, x=_rows(rng, n, cfg.features))
    argv = [
        sys.executable,
        "-c",
        CLI_ENTRY,
        "submit",
        "--owner",
        owner["target"],
        "--modality",
        _MODALITY,
        "--tls",
        str(owner["certs"].requester_dirs["bench"]),
        "--pseudonym-key",
        str(owner["key"]),
        "--inputs",
        str(path),
        "--batch",
        str(cfg.batch),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or f"{n} new" not in proc.stdout:
        raise RuntimeError(f"submit failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return {
        "records": n,
        "file_bytes": path.stat().st_size,
        "seconds": round(seconds, 3),
        "records_per_s": round(n / seconds, 1),
        "output": proc.stdout.strip(),
    }


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def _verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Each target with the figure it is judged on (``None`` when not measured)."""
    sizes = results["disk"]
    largest = sizes[max(sizes, key=int)] if sizes else None
    million = sizes.get("1000000")
    services = results.get("services", {})
    figures = {
        "direct_records_per_s": results["direct"]["records_per_s"],
        "grpc_records_per_s": services.get("grpc_mtls", {}).get("records_per_s"),
        "ingest_1m_seconds": None if million is None else million["seconds"],
        "submit_cli_records_per_s": services.get("submit_cli", {}).get("records_per_s"),
        "disk_ratio": None if largest is None else largest["disk_ratio"],
        "get_logits_p50_ms": services.get("get_logits", {}).get("p50_ms"),
    }
    out = {}
    for name, target in TARGETS.items():
        value = figures[name]
        lower = name.endswith(("seconds", "ratio", "_ms"))
        met = None if value is None else (value <= target if lower else value >= target)
        out[name] = {"value": value, "target": target, "met": met}
    return out


def run_store_bench(
    cfg: StoreBenchConfig,
    *,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run everything of the module docstring; returns the JSON-ready results."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jacfusion-store-")))
        else:
            root = Path(workdir)
            root.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {
            "config": asdict(cfg),
            "environment": _environment(),
            "load_average_before": load_average(),
        }
        progress(f"RecordStore.put of {cfg.records} records")
        results["direct"] = _direct(root / "direct", cfg.records, cfg, cfg.seed)
        progress(f"baseline: the old file layout, {cfg.baseline_records} records")
        results["old_file_layout"] = _old_layout(root / "old", cfg.baseline_records, cfg, cfg.seed)
        results["direct_vs_old_file_layout"] = round(
            results["direct"]["records_per_s"] / results["old_file_layout"]["records_per_s"], 1
        )
        results["disk"] = {}
        for n in cfg.sizes:
            progress(f"disk bytes per record at {n} records")
            results["disk"][str(n)] = _direct(root / f"size-{n}", n, cfg, cfg.seed + n)
        if cfg.services:
            results["services"] = _services(root / "services", cfg, progress)
        results["load_average_after"] = load_average()
        results["targets"] = _verdicts(results)
        return results


def print_results(results: dict[str, Any], console: Any) -> None:
    for name, v in results["targets"].items():
        state = "not measured" if v["value"] is None else "met" if v["met"] else "MISSED"
        console.print(f"{name}: {v['value']} (target {v['target']}): {state}", highlight=False)
    console.print(
        f"direct vs the old file layout: {results['direct_vs_old_file_layout']}x; load average "
        f"{results['load_average_before']} -> {results['load_average_after']}",
        highlight=False,
    )


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, measured, target) rows of the README's table, formatted from the results."""
    services = results.get("services", {})
    disk = results["disk"]
    direct = results["direct"]
    rows = [
        ("`RecordStore.put`, records/s", f"{direct['records_per_s']:,.0f}", "≥ 50,000"),
        ("`RecordStore.put`, records per CPU-second", f"{direct['records_per_cpu_s']:,.0f}", "-"),
    ]
    if "1000000" in disk:
        rows.append(
            ("1,000,000 records into one store, s", f"{disk['1000000']['seconds']:.1f}", "≤ 60")
        )
    if "grpc_mtls" in services:
        rate = services["grpc_mtls"]["records_per_s"]
        rows.append(("`Requester.submit` over mTLS, records/s", f"{rate:,.0f}", "≥ 20,000"))
    if "submit_cli" in services:
        cli = services["submit_cli"]
        rows.append(
            (
                f"`jacfusion-fed submit` of a {cli['records']:,}-record file, records/s",
                f"{cli['records_per_s']:,.0f}",
                "≥ 20,000",
            )
        )
    for n in sorted(disk, key=int):
        rows.append(
            (f"disk at {int(n):,} records, x payload", f"{disk[n]['disk_ratio']:.2f}", "≤ 1.5")
        )
    if "get_logits" in services:
        got = services["get_logits"]
        rows.append(("`GetLogits` of 1,024 cached ids, p50 ms", f"{got['p50_ms']:.2f}", "≤ 5"))
    old = results["old_file_layout"]["records_per_s"]
    rows.append(("the old one-file-per-record layout, same run, records/s", f"{old:,.0f}", "-"))
    return rows
