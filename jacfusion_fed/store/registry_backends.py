"""Where the coordinator's head registry keeps its entries: one small interface, two backends.

:class:`RegistryBackend` is all :class:`~jacfusion_fed.store.head_registry.HeadRegistry` needs:
list the modalities, read a modality's entries (verified), and append an entry inside
:meth:`~RegistryBackend.exclusive`, which serializes registrations across every process that
shares the backend and lets them read the newest state first. An entry is immutable: its
modality, sequence number, JSON metadata, payload (the head as float64 bytes) and the SHA-256
of metadata and payload, checked on every read (a damaged entry raises
:class:`~jacfusion_fed.store.atomic.CorruptFileError` naming it, never falls back).

* :class:`SqliteBackend`, the default (one host; replicas on one machine share the file):
  a table ``heads(modality, sequence, meta, payload, sha256)`` in WAL mode; ``exclusive`` is
  a ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, waited for up to the lock timeout).
* :class:`~jacfusion_fed.store.registry_postgres.PostgresBackend` (replicas on several hosts):
  the same table in PostgreSQL; ``exclusive`` is a transaction holding an advisory lock.

Which backend a ``--registry`` value names (:func:`open_backend`):

* ``postgresql://...`` or ``postgres://...``: PostgreSQL (a libpq connection URI);
* a path ending in ``.sqlite``, ``.sqlite3`` or ``.db``, or an existing file: that SQLite file;
* any other path is a registry directory (what ``results/registry`` has always been): the
  database is ``DIR/registry.sqlite3``. A directory still holding the old file layout
  (``heads/<modality>/<sequence>.head``) is imported into it when first opened, every entry
  verified and under its own sequence number, in one transaction; the old ``heads/`` folder
  is then renamed ``heads.imported/`` (kept, no longer read).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jacfusion_fed.store.atomic import read_verified
from jacfusion_fed.store.registry_entry import RegistryBackend, StoredEntry, seal, verified
from jacfusion_fed.store.sqlite_db import connect, translate, write_transaction

__all__ = [
    "REGISTRY_DB",
    "RegistryBackend",
    "SqliteBackend",
    "StoredEntry",
    "open_backend",
    "seal",
]

REGISTRY_DB = "registry.sqlite3"
_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_ENTRY_RE = re.compile(r"^(\d{8})\.head$")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS heads(modality TEXT NOT NULL, sequence INTEGER NOT NULL, "
    "meta TEXT NOT NULL, payload BLOB NOT NULL, sha256 BLOB NOT NULL, "
    "PRIMARY KEY (modality, sequence))",
    "CREATE TABLE IF NOT EXISTS registry_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class SqliteBackend:
    """Registry entries in one SQLite file (see the module docstring).

    Args:
        path: the database file (created with its folder if missing).
        lock_timeout_s: how long a registration waits for another process's.
        legacy_dir: a registry directory whose old ``heads/`` files are imported.
    """

    def __init__(
        self, path: Path, *, lock_timeout_s: float = 30.0, legacy_dir: Path | None = None
    ) -> None:
        self.path = path
        self.location = str(path)
        self.lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()
        self._con = connect(path, busy_timeout_s=lock_timeout_s)
        try:
            with self.exclusive():
                for statement in _SCHEMA:
                    self._con.execute(statement)
                if legacy_dir is not None:
                    self._import_directory(legacy_dir)
            if legacy_dir is not None and (legacy_dir / "heads").is_dir():
                _retire_directory(legacy_dir)
        except BaseException:
            self._con.close()
            raise

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock, write_transaction(self._con, self.path):
            try:
                yield
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from exc

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._con.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from exc

    def modalities(self) -> list[str]:
        return [m for (m,) in self._read("SELECT DISTINCT modality FROM heads ORDER BY modality")]

    def entries(self, modality: str, *, latest: bool = False) -> list[StoredEntry]:
        sql = "SELECT modality, sequence, meta, payload, sha256 FROM heads WHERE modality = ?"
        sql += " ORDER BY sequence DESC LIMIT 1" if latest else " ORDER BY sequence"
        return [verified(self.location, row) for row in self._read(sql, (modality,))]

    def append(self, entry: StoredEntry) -> None:
        with self._lock:
            try:
                self._con.execute(
                    "INSERT INTO heads(modality, sequence, meta, payload, sha256) "
                    "VALUES (?, ?, ?, ?, ?)",
                    entry.row(),
                )
            except sqlite3.IntegrityError as exc:
                raise FileExistsError(
                    f"{self.location}: entry {entry.modality}/{entry.sequence:08d} exists"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def _import_directory(self, root: Path) -> None:
        """Copy the old layout's verified entries in (inside the open transaction)."""
        heads = root / "heads"
        if not heads.is_dir():
            return
        for d in sorted(heads.iterdir()):
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                m = _ENTRY_RE.match(p.name)
                if m is None:
                    continue
                payload, meta = read_verified(p)
                self._con.execute(
                    "INSERT OR IGNORE INTO heads(modality, sequence, meta, payload, sha256) "
                    "VALUES (?, ?, ?, ?, ?)",
                    StoredEntry(d.name, int(m.group(1)), meta, payload).row(),
                )
        self._con.execute(
            "INSERT OR REPLACE INTO registry_meta(key, value) VALUES ('imported_from', ?)",
            (str(heads),),
        )


def _retire_directory(root: Path) -> None:
    """Rename the imported ``heads/`` out of the way (after the import committed)."""
    target, n = root / "heads.imported", 1
    while target.exists():
        n += 1
        target = root / f"heads.imported.{n}"
    with contextlib.suppress(FileNotFoundError):  # another replica was first
        (root / "heads").rename(target)
    with contextlib.suppress(FileNotFoundError):
        (root / ".registry.lock").unlink()


def open_backend(
    target: str | os.PathLike[str] | RegistryBackend, *, lock_timeout_s: float = 30.0
) -> RegistryBackend:
    """The backend a ``--registry`` value names (the rule of the module docstring)."""
    if isinstance(target, RegistryBackend):
        return target
    text = os.fspath(target)
    if text.startswith(("postgresql://", "postgres://")):
        from jacfusion_fed.store.registry_postgres import PostgresBackend

        return PostgresBackend(text, lock_timeout_s=lock_timeout_s)
    if "://" in text:
        raise ValueError(
            f"registry {text.split('://')[0]}://... is not supported: give a directory, a "
            ".sqlite3 file or a postgresql:// URI"
        )
    path = Path(text)
    if path.suffix in _SQLITE_SUFFIXES or path.is_file():
        return SqliteBackend(path, lock_timeout_s=lock_timeout_s)
    return SqliteBackend(path / REGISTRY_DB, lock_timeout_s=lock_timeout_s, legacy_dir=path)
