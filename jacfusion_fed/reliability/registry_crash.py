"""Durability of registrations on the PostgreSQL head registry under faults.

A child process registers a new head version in a loop (``HeadRegistry("postgresql://...")``,
the code a coordinator replica runs) and prints each acknowledged version; the Gram matrix of
version ``i`` is a fixed function of ``i``. Two kinds of fault, at random moments:

* the registering process is SIGKILLed (``client_kills`` times), and a new one resumes;
* the PostgreSQL server is crashed (immediate shutdown: no checkpoint, recovery at restart)
  while registrations run (``server_crashes`` times); the client sees the connection fail,
  retries, and reconnects once the server is back.

After every fault the registry is read from a fresh connection: sequence numbers run 1..n
without a gap, every entry verifies (its SHA-256) and holds exactly the head of its version, no
version appears twice (a registration whose commit was in doubt and is sent again adds
nothing), every acknowledged version is there, and registering the newest head again adds no
entry.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np

from jacfusion_fed.reliability.postgres import PostgresCluster
from jacfusion_fed.store import CorruptFileError, HeadRegistry

__all__ = ["expected_gram", "registry_crash_run"]

K = 4

_CLIENT = r"""
import sys, time
from jacfusion_fed.reliability.registry_crash import expected_gram
from jacfusion_fed.store import HeadRegistry
uri, start = sys.argv[1], int(sys.argv[2])
registry = None
print("ready", flush=True)
i = start
while True:
    try:
        registry = registry or HeadRegistry(uri, lock_timeout_s=5)
        registry.register("audio", "audio-co", f"v{i:05d}", class_counts=[1] * 4,
                          gram=expected_gram(i))
    except OSError:  # the server is down: retry the same version until it is back
        time.sleep(0.05)
        continue
    print(i, flush=True)
    i += 1
"""


def expected_gram(i: int) -> np.ndarray:
    """The head registered as version ``i`` (symmetric, distinct for every ``i``)."""
    rng = np.random.default_rng(i)
    w = rng.normal(size=(K, K + 2))
    gram: np.ndarray = w @ w.T
    return gram


def _check(uri: str, acked: set[int]) -> dict[str, Any]:
    registry = HeadRegistry(uri)
    try:
        try:
            history = registry.history("audio") if "audio" in registry.modalities() else []
            corrupt = 0
        except CorruptFileError:
            history, corrupt = [], 1
        sequences = [r.sequence for r in history]
        versions = [int(r.model_version[1:]) for r in history]
        wrong = sum(
            not np.array_equal(r.gram_matrix(), expected_gram(v))
            for r, v in zip(history, versions, strict=True)
        )
        again = 0
        if history:
            last = versions[-1]
            redo = registry.register(
                "audio", "audio-co", f"v{last:05d}", class_counts=[1] * K, gram=expected_gram(last)
            )
            again = int(redo.sequence != sequences[-1])
        return {
            "entries": len(history),
            "gaps": int(sequences != list(range(1, len(sequences) + 1))),
            "duplicates": len(versions) - len(set(versions)),
            "torn_or_wrong": wrong,
            "corrupt": corrupt,
            "lost_acknowledged": len(acked - set(versions)),
            "reregister_added": again,
            "next": (versions[-1] + 1) if versions else 0,
        }
    finally:
        registry.close()


def _client(uri: str, start: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, uri, str(start)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the registering process did not start")
    return proc


def _kill(proc: subprocess.Popen[str], acked: set[int]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    acked |= {int(line) for line in out.split()}


def registry_crash_run(
    client_kills: int = 10, server_crashes: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Run the faults of the module docstring on a throwaway cluster; returns the counts."""
    rng = random.Random(seed)
    acked: set[int] = set()
    rounds: list[dict[str, Any]] = []
    with PostgresCluster() as pg:
        uri, start = pg.uri, 0
        HeadRegistry(uri).close()  # creates the table
        for _ in range(client_kills):
            proc = _client(uri, start)
            time.sleep(rng.uniform(0.2, 1.0))
            _kill(proc, acked)
            rounds.append({"fault": "client SIGKILL"} | _check(uri, acked))
            start = rounds[-1]["next"]
        for _ in range(server_crashes):
            proc = _client(uri, start)
            time.sleep(rng.uniform(0.2, 1.0))
            pg.crash()  # immediate shutdown while the client registers
            time.sleep(0.5)
            pg.start()
            time.sleep(rng.uniform(0.5, 1.5))  # the client reconnects and goes on
            _kill(proc, acked)
            rounds.append({"fault": "server crash"} | _check(uri, acked))
            start = rounds[-1]["next"]
    return {
        "client_kills": client_kills,
        "server_crashes": server_crashes,
        "acknowledged_registrations": len(acked),
        "entries": rounds[-1]["entries"] if rounds else 0,
        **{
            key: sum(r[key] for r in rounds)
            for key in (
                "gaps",
                "duplicates",
                "torn_or_wrong",
                "corrupt",
                "lost_acknowledged",
                "reregister_added",
            )
        },
        "rounds": rounds,
    }
