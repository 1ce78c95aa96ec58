"""Durability of the owner's records under SIGKILL: every batch whole or absent, nothing corrupt,
resubmission idempotent (``docs/results/durability-store.json``; ``docs/reliability.md``).

* :func:`owner_crash_run`: an ``owner serve`` process (the CLI, mTLS on loopback) receives a
  stream of ``batches`` ``PutRecords`` batches from this process; once a random batch of the
  stream is acknowledged it is SIGKILLed after a random 0-30 ms (the next batch then is being
  sent, validated, committed or answered). After each kill the workspace's store is opened
  (a restart of the store) and checked: each batch has all of its records or none, every
  acknowledged batch is all there, every record present reads back verified and
  byte-identical to what was sent, ``PRAGMA integrity_check`` is ``ok``. The next round
  starts the owner again and resumes the stream at the first batch not stored. At the end
  every record is sent once more through ``Requester.submit`` (all "unchanged" or "new":
  nothing "replaced"), then once again (all "unchanged").
* :func:`store_crash_run`: the same checks for a child process calling
  :meth:`RecordStore.put` in a loop with larger batches (a kill lands inside a transaction
  more often), SIGKILLed ``rounds`` times.

``python -m jacfusion_fed.reliability.store_crash --out docs/results/durability-store.json``
runs both and the PostgreSQL registry run (:mod:`.registry_crash`).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.processes import ProcessSet
from jacfusion_fed.store.record_store import DB_NAME, RecordStore

__all__ = ["CrashConfig", "check_batches", "owner_crash_run", "store_crash_run"]

_MODALITY = "vec"


@dataclass(frozen=True)
class CrashConfig:
    batches: int = 150
    batch_records: int = 64
    features: int = 16
    owner_kills: int = 6
    store_kills: int = 20
    store_batch_records: int = 2048
    seed: int = 0


def _data(cfg: CrashConfig, n: int, features: int) -> np.ndarray:
    return np.random.default_rng(cfg.seed).random((n, features), dtype=np.float32)


def check_batches(
    root: Path, fingerprint: str, ids: list[str], x: np.ndarray, size: int, acked: set[int]
) -> dict[str, Any]:
    """Open the store under ``root`` and check every batch of ``size`` records (see the module
    docstring). Returns the counts; ``partial``, ``lost_acknowledged`` and ``corrupt`` must be
    0 (a corrupt record raises ``CorruptFileError``, counted here)."""
    from jacfusion_fed.store.atomic import CorruptFileError

    store = RecordStore(root, fingerprint)
    try:
        try:
            got = store.get_many(ids)
            corrupt = 0
        except CorruptFileError:
            got, corrupt = {}, 1
        present, partial, lost, mismatched = [], 0, 0, 0
        for b in range(len(ids) // size):
            held = [i for i in range(b * size, (b + 1) * size) if ids[i] in got]
            if len(held) == size:
                present.append(b)
                mismatched += sum(not np.array_equal(got[ids[i]], x[i]) for i in held)
            elif held:
                partial += 1
            if b in acked and len(held) != size:
                lost += 1
        con = sqlite3.connect(root / DB_NAME)
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        con.close()
    finally:
        store.close()
    return {
        "present": present,
        "partial": partial,
        "lost_acknowledged": lost,
        "corrupt": corrupt + mismatched,
        "integrity_check": integrity,
    }


def _owner_args(root: Path, certs: Any, key: Path, port_file: Path) -> list[str]:
    from jacfusion_fed.bench.deployment import owner_serve_args

    tls_dir = certs.owner_dirs[f"{_MODALITY}-co"]
    return owner_serve_args(
        root / "ws", _MODALITY, root / "train.npz", key, tls_dir, port_file, epochs=1
    )


def owner_crash_run(root: Path, cfg: CrashConfig) -> dict[str, Any]:
    """SIGKILL an ``owner serve`` process during a stream of PutRecords batches (see above)."""
    from jacfusion_fed.privacy.cert_names import owner_server_name
    from jacfusion_fed.privacy.certs import generate_deployment_certs
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
    from jacfusion_fed.requester import Requester
    from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
    from jacfusion_fed.rpc.tensor import encode_tensor
    from jacfusion_fed.rpc.tls import TlsFiles, create_channel

    root.mkdir(parents=True, exist_ok=True)
    certs = generate_deployment_certs(root / "certs", {f"{_MODALITY}-co": _MODALITY}, ["hosp"])
    key = write_key(root / "pseudonym.key", generate_key())
    pz = Pseudonymizer.from_file(key)
    rng = np.random.default_rng(cfg.seed)
    np.savez(
        root / "train.npz",
        x_train=rng.random((256, cfg.features), dtype=np.float32),
        y_train=rng.integers(0, 3, 256),
    )
    n, size = cfg.batches * cfg.batch_records, cfg.batch_records
    local = [f"crash-{i:06d}" for i in range(n)]
    ids, x = pz.many(local), _data(cfg, n, cfg.features)
    procs, port_file = ProcessSet(root / "logs", prefix=(sys.executable,)), root / "owner.port"
    tls = TlsFiles.from_dir(certs.requester_dirs["hosp"])
    timer = random.Random(cfg.seed)
    acked: set[int] = set()
    rounds: list[dict[str, Any]] = []
    next_batch, in_flight_stored, in_flight_absent = 0, 0, 0
    # kill points: after these batches, spread over the stream
    points = sorted(timer.sample(range(5, cfg.batches - 5), cfg.owner_kills))
    try:
        while len(rounds) < cfg.owner_kills and next_batch < cfg.batches:
            port_file.unlink(missing_ok=True)
            procs.start_serving("owner", _owner_args(root, certs, key, port_file), port_file)
            target = f"127.0.0.1:{procs.wait_port('owner', port_file, timeout=300)}"
            channel = create_channel(target, tls, server_name=owner_server_name(_MODALITY))
            stub = modality_pb2_grpc.ModalityServiceStub(channel)
            point = points[len(rounds)]
            delay = timer.uniform(0.0, 0.03)
            reached = threading.Event()

            def kill_when_reached(delay: float = delay, reached: threading.Event = reached) -> None:
                reached.wait()
                time.sleep(delay)  # somewhere in the next batch: sent, stored, or answered
                procs.kill("owner")

            killer = threading.Thread(target=kill_when_reached)
            killer.start()
            b, in_flight = next_batch, None
            while b < cfg.batches:
                if b >= point:
                    reached.set()
                part = slice(b * size, (b + 1) * size)
                request = modality_pb2.PutRecordsRequest(
                    sample_ids=ids[part],
                    inputs=encode_tensor(x[part]),
                    key_fingerprint=pz.fingerprint,
                )
                try:
                    stub.PutRecords(request, timeout=30)
                except Exception:  # the owner was killed with this batch in flight
                    in_flight = b
                    break
                acked.add(b)
                b += 1
            reached.set()
            killer.join()
            channel.close()
            check = check_batches(root / "ws" / "live", pz.fingerprint, ids, x, size, acked)
            if in_flight is not None:
                stored = in_flight in check["present"]
                in_flight_stored += stored
                in_flight_absent += not stored
            missing = [b for b in range(cfg.batches) if b not in set(check["present"])]
            next_batch = missing[0] if missing else cfg.batches
            rounds.append(
                {
                    "killed_after_batch": point,
                    "kill_delay_s": round(delay, 4),
                    "in_flight": in_flight,
                    "batches_present": len(check["present"]),
                    **{k: v for k, v in check.items() if k != "present"},
                }
            )
        port_file.unlink(missing_ok=True)
        procs.start_serving("owner", _owner_args(root, certs, key, port_file), port_file)
        target = f"127.0.0.1:{procs.wait_port('owner', port_file, timeout=300)}"
        with Requester(owners={_MODALITY: target}, tls=tls, pseudonym_key=key) as req:
            first = req.submit(_MODALITY, local, x, batch_size=size, progress=False)
            second = req.submit(_MODALITY, local, x, batch_size=size, progress=False)
        procs.stop("owner")
        final = check_batches(root / "ws" / "live", pz.fingerprint, ids, x, size, acked)
    finally:
        procs.stop_all()
    return {
        "batches": cfg.batches,
        "batch_records": size,
        "kills": len(rounds),
        "kills_with_a_batch_in_flight": in_flight_stored + in_flight_absent,
        "in_flight_batches_found_stored": in_flight_stored,
        "in_flight_batches_found_absent": in_flight_absent,
        "acknowledged_batches": len(acked),
        "partial_batches": sum(r["partial"] for r in rounds) + final["partial"],
        "lost_acknowledged_batches": sum(r["lost_acknowledged"] for r in rounds),
        "corrupt_records": sum(r["corrupt"] for r in rounds) + final["corrupt"],
        "integrity_checks_not_ok": sum(r["integrity_check"] != "ok" for r in [*rounds, final]),
        "resubmit": {
            "stored": first.stored,
            "unchanged": first.unchanged,
            "replaced": first.replaced,
        },
        "second_resubmit": {
            "stored": second.stored,
            "unchanged": second.unchanged,
            "replaced": second.replaced,
        },
        "batches_present_at_end": len(final["present"]),
        "rounds": rounds,
    }


_STORE_WRITER = r"""
import sys
from jacfusion_fed.reliability.store_crash import store_batch
from jacfusion_fed.store.record_store import RecordStore
root, start, size, batches, seed = sys.argv[1], *map(int, sys.argv[2:6])
store = RecordStore(root, "0" * 16)
print("ready", flush=True)
for b in range(start, batches):
    store.put(*store_batch(b, size, seed))
    print(b, flush=True)
"""


def store_batch(b: int, size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Batch ``b`` of :func:`store_crash_run`: ids and 76-float records, fixed by ``seed``."""
    x = np.random.default_rng([seed, b]).random((size, 76), dtype=np.float32)
    return [f"{i:064x}" for i in range(b * size, (b + 1) * size)], x


def store_crash_run(root: Path, cfg: CrashConfig) -> dict[str, Any]:
    """SIGKILL a process calling ``RecordStore.put`` in a loop, ``store_kills`` times."""
    size = cfg.store_batch_records
    # Each round acknowledges at most 8 batches before its kill, so this many never run out.
    batches = max(cfg.batches, 8 * cfg.store_kills + 8)
    parts = [store_batch(b, size, cfg.seed) for b in range(batches)]
    ids = [sid for part_ids, _ in parts for sid in part_ids]
    x = np.concatenate([part_x for _, part_x in parts])
    timer, acked, start = random.Random(cfg.seed + 1), set[int](), 0
    rounds: list[dict[str, Any]] = []
    root.mkdir(parents=True, exist_ok=True)
    while len(rounds) < cfg.store_kills and start < batches:
        argv = [_STORE_WRITER, str(root), str(start), str(size), str(batches), str(cfg.seed)]
        proc = subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the writer did not start")
        # Killed after a random number of acknowledged batches, a random moment into the next
        # put: independent of how fast the machine writes (a time-based kill let a quiet
        # machine finish every batch before the last kill).
        for _ in range(timer.randint(1, 8)):
            line = proc.stdout.readline()
            if not line:
                break
            acked.add(int(line))
        time.sleep(timer.uniform(0.0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        acked |= {int(line) for line in out.split()}
        check = check_batches(root, "0" * 16, ids, x, size, acked)
        missing = [b for b in range(batches) if b not in set(check["present"])]
        start = missing[0] if missing else batches
        rounds.append(
            {"batches_present": len(check["present"])}
            | {k: v for k, v in check.items() if k != "present"}
        )
    return {
        "batch_records": size,
        "kills": len(rounds),
        "acknowledged_batches": len(acked),
        "partial_batches": sum(r["partial"] for r in rounds),
        "lost_acknowledged_batches": sum(r["lost_acknowledged"] for r in rounds),
        "corrupt_records": sum(r["corrupt"] for r in rounds),
        "integrity_checks_not_ok": sum(r["integrity_check"] != "ok" for r in rounds),
        "rounds": rounds,
    }


def run_all(root: Path, cfg: CrashConfig, *, registry: bool = True) -> dict[str, Any]:
    """Every run of this module (and the PostgreSQL registry's), with the machine's load."""
    import platform

    from jacfusion_fed.bench.serve import load_average

    results: dict[str, Any] = {
        "config": asdict(cfg),
        "environment": {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_average_before": load_average(),
    }
    results["owner_sigkill"] = owner_crash_run(root / "owner", cfg)
    results["store_sigkill"] = store_crash_run(root / "store", cfg)
    if registry:
        from jacfusion_fed.reliability.registry_crash import registry_crash_run

        results["registry_postgres"] = registry_crash_run(seed=cfg.seed)
    results["load_average_after"] = load_average()
    return results


def _main(argv: list[str]) -> None:
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description="SIGKILL durability runs of the record store")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--owner-kills", type=int, default=CrashConfig.owner_kills)
    parser.add_argument("--store-kills", type=int, default=CrashConfig.store_kills)
    args = parser.parse_args(argv)
    cfg = CrashConfig(owner_kills=args.owner_kills, store_kills=args.store_kills)
    with tempfile.TemporaryDirectory(prefix="jacfusion-crash-") as tmp:
        results = run_all(Path(tmp), cfg)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1:])
