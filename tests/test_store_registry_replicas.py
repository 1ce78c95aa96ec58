"""The head registry shared by several coordinator processes, on each backend: SQLite (a
registry directory) and PostgreSQL (a throwaway cluster; those cases are e2e).

Two processes register heads into one registry at the same time, released together by a
barrier file; every registration must land under its own sequence number (none overwritten,
none lost), and a K mismatch between modalities must be caught even when the two
registrations race.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_postgres import cluster, fresh_database

from jacfusion_fed.reliability.postgres import PostgresCluster
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


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    yield from cluster()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the registry lives: a directory, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "reg")
    return fresh_database(request.getfixturevalue("postgres"))


def _run_two(
    tmp_path: Path, target: str, args_a: list[str], args_b: list[str]
) -> list[tuple[int, int]]:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, target, *args, str(go)],
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


def test_two_processes_register_without_losing_an_entry(tmp_path: Path, target: str) -> None:
    n = 150
    counts = _run_two(tmp_path, target, ["a", str(n), "3", "audio"], ["b", str(n), "3", "audio"])
    assert counts == [(n, 0), (n, 0)]
    reg = HeadRegistry(target)
    history = reg.history("audio")
    assert [r.sequence for r in history] == list(range(1, 2 * n + 1))
    versions = sorted(r.model_version for r in history)
    assert versions == sorted([f"a-{i}" for i in range(n)] + [f"b-{i}" for i in range(n)])
    # each entry holds the head its own writer registered (no torn or swapped payloads)
    for rec in history:
        tag, i = rec.model_version.split("-")
        expected = np.eye(3) * (1.0 + int(i)) + (0.01 if tag == "a" else 0.02)
        np.testing.assert_array_equal(rec.gram_matrix(), expected)


def test_racing_modalities_with_different_k_cannot_both_register(
    tmp_path: Path, target: str
) -> None:
    counts = _run_two(tmp_path, target, ["a", "1", "3", "image"], ["b", "1", "4", "audio"])
    assert sorted(ok for ok, _ in counts) == [0, 1]
    reg = HeadRegistry(target)
    assert len(reg.modalities()) == 1


def test_a_replica_sees_another_replicas_registration(target: str) -> None:
    first, second = HeadRegistry(target), HeadRegistry(target)
    first.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2))
    assert second.get("audio").model_version == "v1"
    again = second.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2))
    assert again.sequence == 1  # identical head: nothing added by the second replica


def test_a_stuck_lock_times_out_with_a_clear_error(tmp_path: Path, target: str) -> None:
    reg = HeadRegistry(target, lock_timeout_s=0.2)
    with (
        _another_process_holds_the_lock(target),
        pytest.raises(TimeoutError, match="stayed locked"),
    ):
        reg.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2))
    assert reg.register("audio", "site", "v1", class_counts=[1, 1], gram=np.eye(2)).sequence == 1


def test_opening_waits_out_a_writer_on_a_database_not_yet_in_wal_mode(tmp_path: Path) -> None:
    """Switching to WAL while another connection writes is answered "locked" at once (SQLite
    skips its busy handler there); connect retries until the busy timeout, so a second
    replica opening a fresh registry together with the first one does not fail (a CI run of
    the race test above saw it fail so)."""
    import threading

    from jacfusion_fed.store.sqlite_db import StoreLockedError, connect

    path = tmp_path / "fresh.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")  # still in rollback-journal mode
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    commit = threading.Timer(0.3, writer.execute, ("COMMIT",))
    start = time.monotonic()
    commit.start()
    try:
        con = connect(path, busy_timeout_s=10.0)
    finally:
        commit.join()
    assert time.monotonic() - start >= 0.25  # it waited for the writer, then switched
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
    con.close()
    # a writer that never lets go: the same clear error as any stuck lock, after the timeout
    other = tmp_path / "stuck.sqlite3"
    writer = sqlite3.connect(other, isolation_level=None)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    start = time.monotonic()
    with pytest.raises(StoreLockedError, match="stayed locked"):
        connect(other, busy_timeout_s=0.3)
    assert time.monotonic() - start >= 0.25
    writer.execute("ROLLBACK")
    writer.close()


@contextlib.contextmanager
def _another_process_holds_the_lock(target: str) -> Iterator[None]:
    """What a registration waits for: SQLite's write lock, PostgreSQL's advisory lock."""
    if target.startswith("postgresql://"):
        import psycopg

        from jacfusion_fed.store.registry_postgres import ADVISORY_LOCK_KEY

        with psycopg.connect(target, autocommit=True) as con:
            con.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
            yield
        return
    other = sqlite3.connect(Path(target) / "registry.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock and hangs
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def _old_entry(root: Path, modality: str, sequence: int, version: str, gram: np.ndarray) -> None:
    """An entry as the directory registry wrote it (one verified envelope per registration)."""
    from jacfusion_fed.store.atomic import write_verified

    k = gram.shape[0]
    meta = {
        "kind": "head",
        "modality": modality,
        "owner": "site",
        "model_version": version,
        "num_classes": k,
        "feature_dim": None,
        "head_kind": "gram",
        "class_counts": [1] * k,
        "class_names": [],
        "registered_at": "2026-01-02T03:04:05+00:00",
        "sequence": sequence,
    }
    path = root / "heads" / modality / f"{sequence:08d}.head"
    write_verified(path, np.ascontiguousarray(gram, dtype="<f8").tobytes(), meta)


def test_a_registry_directory_of_the_old_layout_is_imported(tmp_path: Path) -> None:
    for seq, version in ((1, "v1"), (2, "v2")):
        _old_entry(tmp_path, "audio", seq, version, np.eye(3) * seq)
    _old_entry(tmp_path, "image", 1, "w1", np.eye(3))
    (tmp_path / ".registry.lock").touch()
    reg = HeadRegistry(tmp_path)  # what `--registry results/registry` opens
    assert [r.model_version for r in reg.history("audio")] == ["v1", "v2"]
    np.testing.assert_array_equal(reg.get("audio").gram_matrix(), np.eye(3) * 2)
    assert reg.get("audio").registered_at.year == 2026
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "heads.imported",
        "registry.sqlite3",
        "registry.sqlite3-shm",
        "registry.sqlite3-wal",
    ]
    assert reg.register("audio", "site", "v3", class_counts=[1] * 3, gram=np.eye(3)).sequence == 3
    assert [r.sequence for r in HeadRegistry(tmp_path).history("audio")] == [1, 2, 3]


def test_a_damaged_old_entry_stops_the_import(tmp_path: Path) -> None:
    from jacfusion_fed.store import CorruptFileError

    _old_entry(tmp_path, "audio", 1, "v1", np.eye(2))
    entry = tmp_path / "heads" / "audio" / "00000001.head"
    entry.write_bytes(entry.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CorruptFileError, match=r"00000001\.head"):
        HeadRegistry(tmp_path)
    assert entry.exists() and not (tmp_path / "heads.imported").exists()


def test_which_backend_a_registry_value_names(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app
    from jacfusion_fed.store.registry_backends import SqliteBackend, open_backend

    single = open_backend(tmp_path / "heads.sqlite3")
    assert isinstance(single, SqliteBackend) and single.location == str(tmp_path / "heads.sqlite3")
    in_dir = open_backend(tmp_path / "reg")
    assert in_dir.location == str(tmp_path / "reg" / "registry.sqlite3")
    with pytest.raises(ValueError, match="not supported"):
        open_backend("mysql://db/heads")
    serve = ["coordinator", "serve", "--insecure", "--port", "0", "--owner", "a=127.0.0.1:9"]
    result = CliRunner().invoke(app, [*serve, "--registry", "postgresql://x@127.0.0.1:1/none"])
    assert result.exit_code == 1, result.output
    assert "cannot open the head registry" in result.output and "127.0.0.1" in result.output
    result = CliRunner().invoke(app, [*serve, "--registry", "mysql://db/heads"])
    assert result.exit_code == 2 and "is not supported" in result.output
