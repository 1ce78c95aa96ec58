"""The one way this package opens SQLite databases (the owner's records, the head registry).

Every database is opened with the same settings:

* ``journal_mode=WAL``: readers never block the writer; a transaction is appended to the
  ``-wal`` file and is whole or absent after a crash (SQLite's own recovery);
* ``synchronous=FULL``: a commit is on disk (fsync of the WAL) before it returns, so an
  acknowledged write survives a power cut, not only a killed process;
* ``secure_delete=ON``: deleted rows, freed pages and freelist pages are overwritten with
  zeros, so erased content does not linger in the database file's free space;
* ``temp_store=MEMORY``: sorts and temporary tables never spill record bytes to temp files;
* ``busy_timeout``: another process holding the write lock is waited for, then
  :class:`StoreLockedError` (a ``TimeoutError``) is raised. Switching a database to WAL
  needs an exclusive lock, and SQLite answers that switch "locked" at once, without its busy
  handler, while another connection writes (to avoid a deadlock); :func:`connect` retries it
  with a backoff until the same timeout (two processes opening a fresh registry together hit
  this: a CI run of the registry's replica race test did).

:func:`erase_wal` checkpoints and truncates the WAL (``wal_checkpoint(TRUNCATE)``): after an
erasure, the old page images that still held the erased rows leave the ``-wal`` file too.
The ``-shm`` file holds only the WAL's index (page numbers and checksums), never row content.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from jacfusion_fed.store.atomic import CorruptFileError

__all__ = [
    "StoreLockedError",
    "StoreUnavailableError",
    "connect",
    "erase_wal",
    "sqlite_files",
    "translate",
    "write_transaction",
]

#: Most host parameters one statement binds (SQLite's limit is 32766 since 3.32).
MAX_PARAMS = 30_000


class StoreLockedError(TimeoutError):
    """Another process held the database's write lock for longer than the busy timeout."""


class StoreUnavailableError(OSError):
    """The database cannot be written or read now (disk full, I/O error, server gone)."""


def sqlite_files(path: Path) -> list[Path]:
    """The database file and the companions SQLite may create next to it."""
    return [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))]


def connect(path: Path, *, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    """Open (creating) ``path`` with the settings of the module docstring.

    The connection is in autocommit mode (transactions are explicit, see
    :func:`write_transaction`) and may be used from any thread: callers serialize access.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        mode = _switch_to_wal(con, busy_timeout_s)
        if str(mode).lower() != "wal":
            raise StoreUnavailableError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        for pragma in (
            "synchronous=FULL",
            "secure_delete=ON",
            "temp_store=MEMORY",
            "cache_size=-16384",
            "journal_size_limit=67108864",
        ):
            con.execute(f"PRAGMA {pragma}")
        if con.execute("PRAGMA secure_delete").fetchone()[0] != 1:
            raise StoreUnavailableError(f"{path}: this SQLite cannot switch secure_delete on")
    except sqlite3.Error as exc:
        con.close()
        raise translate(exc, path) from exc
    except BaseException:
        con.close()
        raise
    return con


def _switch_to_wal(con: sqlite3.Connection, busy_timeout_s: float) -> str:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock (module
    docstring), up to ``busy_timeout_s``; returns the journal mode SQLite reports."""
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.001
    while True:
        try:
            return str(con.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if ("locked" not in text and "busy" not in text) or time.monotonic() >= deadline:
                raise
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(2 * delay, 0.05)


def translate(exc: sqlite3.Error, path: Path) -> Exception:
    """The exception a caller should see for an SQLite error on ``path``."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return StoreLockedError(f"{path} stayed locked by another process ({text})")
    if "malformed" in text or "not a database" in text:
        return CorruptFileError(path, f"SQLite database damaged ({text})")
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailableError(f"{path}: {text}")
    return exc


@contextlib.contextmanager
def write_transaction(con: sqlite3.Connection, path: Path) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception): all or nothing."""
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        yield con
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise
    try:
        con.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise translate(exc, path) from exc


_checkpoint_lock = threading.Lock()


def erase_wal(con: sqlite3.Connection, path: Path, *, attempts: int = 50) -> bool:
    """Copy the WAL into the database and truncate it to zero bytes; ``True`` when done.

    A reader in another process can hold the checkpoint back; it is retried for a while
    (``attempts`` times 20 ms) before giving up (``False``: the caller says so).
    """
    with _checkpoint_lock:
        for _ in range(attempts):
            try:
                busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                raise translate(exc, path) from exc
            if busy == 0:
                return True
            time.sleep(0.02)
    return False
