"""The head registry shared by several coordinator processes (replicas on one directory).

Two processes register heads into one registry at the same time, released together by a
barrier file; every registration must land under its own sequence number (none overwritten,
none lost), and a K mismatch between modalities must be caught even when the two
registrations race.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jacfusion_fed.store import HeadRegistry

_WORKER = r"""
import sys, time
from pathlib import Path
import numpy as np
from jacfusion_fed.store import HeadRegistry

root, tag, modality, go = sys.argv[1], sys.argv[2], sys.argv[5], Path(sys.argv[6])
n, k = int(sys.argv[3]), int(sys.argv[4])
reg = HeadRegistry(root)
deadline = time.monotonic() + 30
while not go.exists():  # bounded wait for the common start signal
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.001)
ok = refused = 0
for i in range(n):
    gram = np.eye(k) * (1.0 + i) + (0.01 if tag == "a" else 0.02)
    try:
        reg.register(modality, "site", f"{tag}-{i}", class_counts=[1] * k, gram=gram)
        ok += 1
    except ValueError as exc:
        if "K=" not in str(exc):
            raise
        refused += 1
print(ok, refused)
"""


def _run_two(tmp_path: Path, args_a: list[str], args_b: list[str]) -> list[tuple[int, int]]:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path / "reg"), *args, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (args_a, args_b)
    ]
    time.sleep(1.0)  # both have imported numpy and opened the registry (bounded anyway)
    go.touch()
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        ok, refused = stdout.split()
        out.append((int(ok), int(refused)))
    return out


def test_two_processes_register_without_losing_an_entry(tmp_path: Path) -> None:
    n = 150
    counts = _run_two(tmp_path, ["a", str(n), "3", "audio"], ["b", str(n), "3", "audio"])
    assert counts == [(n, 0), (n, 0)]
    reg = HeadRegistry(tmp_path / "reg")
    history = reg.history("audio")
    assert [r.sequence for r in history] == list(range(1, 2 * n + 1))
    versions = sorted(r.model_version for r in history)
    assert versions == sorted([f"a-{i}" for i in range(n)] + [f"b-{i}" for i in range(n)])
    # each entry holds the head its own writer registered (no torn or swapped payloads)
    for rec in history:
        tag, i = rec.model_version.split("-")
        expected = np.eye(3) * (1.0 + int(i)) + (0.01 if tag == "a" else 0.02)
        np.testing.assert_array_equal(rec.gram_matrix(), expected)


def test_racing_modalities_with_different_k_cannot_both_register(tmp_path: Path) -> None:
    counts = _run_two(tmp_path, ["a", "1", "3", "image"], ["b", "1", "4", "audio"])
    assert sorted(ok for ok, _ in counts) == [0, 1]
    reg = HeadRegistry(tmp_path / "reg")
    assert len(reg.modalities()) == 1


def test_a_replica_sees_another_replicas_registration(tmp_path: Path) -> None:
    first, second = HeadRegistry(tmp_path), HeadRegistry(tmp_path)
    first.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2))
    assert second.get("audio").model_version == "v1"
    again = second.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2))
    assert again.sequence == 1  # identical head: nothing added by the second replica


def test_a_stuck_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    import sqlite3

    reg = HeadRegistry(tmp_path, lock_timeout_s=0.2)
    other = sqlite3.connect(tmp_path / "registry.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock and hangs
    try:
        with pytest.raises(TimeoutError, match="stayed locked"):
            reg.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert reg.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2)).sequence == 1
