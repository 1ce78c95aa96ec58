"""The head registry in PostgreSQL, for coordinator replicas on several hosts (psycopg 3).

``coordinator serve --registry postgresql://USER@HOST:PORT/DB`` (any libpq URI; a password is
better kept in ``~/.pgpass`` or ``PGPASSWORD`` than in the URI). The table is the SQLite
backend's (:mod:`jacfusion_fed.store.registry_backends`)::

    jacfusion_heads(modality TEXT, sequence INTEGER, meta TEXT, payload BYTEA, sha256 BYTEA,
                    PRIMARY KEY (modality, sequence))

created if missing. A registration runs in one transaction that first takes a
transaction-scoped advisory lock (``pg_advisory_xact_lock``), so replicas on any host register
one at a time and each re-reads the newest entries before it appends; PostgreSQL's commit makes
the entry whole or absent, also if the replica or the server is killed. Readers take no lock.
A lost connection is opened again on the next call; a call that fails for it raises
:class:`~jacfusion_fed.store.sqlite_db.StoreUnavailableError` (an ``OSError``: the
coordinator reports UNAVAILABLE and retries on its next sync).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from jacfusion_fed.store.registry_entry import StoredEntry, verified
from jacfusion_fed.store.sqlite_db import StoreLockedError, StoreUnavailableError

__all__ = ["ADVISORY_LOCK_KEY", "PostgresBackend", "redact"]

_TABLE = "jacfusion_heads"
#: Advisory lock key of registrations (any constant shared by every replica).
ADVISORY_LOCK_KEY = 0x4A464844  # "JFHD"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_TABLE}(modality TEXT NOT NULL, sequence INTEGER NOT NULL, "
    "meta TEXT NOT NULL, payload BYTEA NOT NULL, sha256 BYTEA NOT NULL, "
    "PRIMARY KEY (modality, sequence))"
)


def redact(uri: str) -> str:
    """The URI without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)


class PostgresBackend:
    """Registry entries in PostgreSQL (see the module docstring).

    Args:
        uri: a libpq connection URI (``postgresql://...``).
        lock_timeout_s: how long a registration waits for another replica's.
        connect_timeout_s: how long opening a connection may take.
    """

    def __init__(
        self, uri: str, *, lock_timeout_s: float = 30.0, connect_timeout_s: float = 10.0
    ) -> None:
        self.uri = uri
        self.location = redact(uri)
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.RLock()
        self._con: psycopg.Connection[Any] | None = None
        with self.exclusive():  # the lock also orders concurrent CREATE TABLEs
            self._cursor().execute(_SCHEMA)

    # --- connections -----------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._con is None or self._con.closed or self._con.broken:
            try:
                self._con = psycopg.connect(
                    self.uri, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s))
                )
            except psycopg.Error as exc:
                raise StoreUnavailableError(
                    f"cannot connect to the registry {self.location}: {exc}"
                ) from exc
        return self._con

    def _cursor(self) -> psycopg.Cursor[Any]:
        return self._connection().cursor()

    def _failure(self, exc: psycopg.Error) -> Exception:
        if isinstance(exc, pg_errors.LockNotAvailable):
            return StoreLockedError(
                f"head registry {self.location} stayed locked for {self.lock_timeout_s:g} s "
                "(another coordinator stuck?)"
            )
        if isinstance(exc, psycopg.OperationalError):
            return StoreUnavailableError(f"head registry {self.location}: {exc}")
        return exc

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            con = self._connection()
            try:
                with con.transaction():
                    ms = max(1, int(self.lock_timeout_s * 1000))
                    con.execute(f"SET LOCAL lock_timeout = {ms}")
                    con.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
                    yield
            except psycopg.Error as exc:
                raise self._failure(exc) from exc

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            for attempt in (1, 2):  # once more on a fresh connection after a lost one
                try:
                    return self._cursor().execute(sql, args).fetchall()
                except psycopg.OperationalError as exc:
                    if attempt == 2 or self._con is None or not self._con.broken:
                        raise self._failure(exc) from exc
                except psycopg.Error as exc:
                    raise self._failure(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- the interface ---------------------------------------------------------------------

    def modalities(self) -> list[str]:
        rows = self._read(f"SELECT DISTINCT modality FROM {_TABLE} ORDER BY modality")
        return [str(m) for (m,) in rows]

    def entries(self, modality: str, *, latest: bool = False) -> list[StoredEntry]:
        sql = f"SELECT modality, sequence, meta, payload, sha256 FROM {_TABLE} WHERE modality = %s"
        sql += " ORDER BY sequence DESC LIMIT 1" if latest else " ORDER BY sequence"
        return [verified(self.location, row) for row in self._read(sql, (modality,))]

    def append(self, entry: StoredEntry) -> None:
        with self._lock:
            try:
                self._cursor().execute(
                    f"INSERT INTO {_TABLE}(modality, sequence, meta, payload, sha256) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    entry.row(),
                )
            except pg_errors.UniqueViolation as exc:
                raise FileExistsError(
                    f"{self.location}: entry {entry.modality}/{entry.sequence:08d} exists"
                ) from exc

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
