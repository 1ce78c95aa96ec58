"""Live records of one owner (inputs sent with ``PutRecords``), keyed by pseudonym, in SQLite.

Layout under ``root``: one database, ``records.sqlite3`` (with its ``-wal`` and ``-shm``
files; settings in :mod:`jacfusion_fed.store.sqlite_db`: WAL, ``synchronous=FULL``,
``secure_delete=ON``)::

    meta(key, value)                  key_fingerprint; migrated_from_files (see migration)
    records(rid INTEGER PRIMARY KEY,  append order; a record keeps its rid when replaced
            id BLOB,                  the pseudonym: 32 bytes (hex form) or 0x01 + 32 (base32)
            sha256 BLOB,              content_hash(x) as 32 bytes, checked on every read
            dtype TEXT, shape TEXT,   e.g. '<f4' and '1,8,8'
            stored_at REAL, expires_at REAL NULL,   Unix seconds
            data BLOB)                the input, raw little-endian bytes
    versions(vid INTEGER PRIMARY KEY, version TEXT UNIQUE)
    logits(vid, rid, digest, data)   one row per record and model version (K float64 and an
                                      8-byte BLAKE2b of them), WITHOUT ROWID, key (vid, rid)
    retired(id BLOB PRIMARY KEY)      pseudonyms of rotated-out keys (refused)

Why this shape (measured on 2 cores, ``bench store``): ids are random (HMAC), so a B-tree index
on them turns every record of a batch into a write of a random index page: with a UNIQUE index
a batch of 1,024 records wrote ~8x its payload to the WAL and ingest ran at a third of the
speed. Records are therefore appended in rid order (sequential pages, ~1.35x the payload on
disk) and the id -> rid map is kept in memory, rebuilt when the store opens (and whenever
another process has committed, detected by ``PRAGMA data_version``). A logit row is keyed by
the record's small rid, not its 32-byte id, and holds one id's logits, so erasing a record
deletes exactly its rows and a cache hit is a point lookup; a blob per batch would mix the
logits of many records in one row.

Semantics (what ``PutRecords`` / ``DeleteRecords`` promise):

* one ``put`` is one transaction: the whole batch is stored or nothing is;
* the same id with the same content is a no-op; different content raises
  :class:`RecordConflictError` (nothing stored) unless ``replace``, which also drops that
  id's cached logits (and, like an erasure, truncates the WAL: the old content is gone);
* :meth:`RecordStore.delete` removes the input and every cached logit of the id, then
  truncates the WAL (:func:`~jacfusion_fed.store.sqlite_db.erase_wal`): with
  ``secure_delete`` no byte of the record is left in any file of the store; an expired record
  is deleted the same way the next time anything reads or purges it.

Pseudonyms and caches belong to one key: a store opened with another key's fingerprint raises
:class:`KeyMismatchError` (rotate with :meth:`RecordStore.rekey`, one transaction).
A workspace still in the one-file-per-record layout raises :class:`LegacyLayoutError` until it
is migrated (:mod:`jacfusion_fed.store.record_migration`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from jacfusion_fed.privacy.pseudonyms import is_pseudonym
from jacfusion_fed.store.atomic import CorruptFileError
from jacfusion_fed.store.sqlite_db import (
    MAX_PARAMS,
    connect,
    erase_wal,
    translate,
    write_transaction,
)

__all__ = [
    "DB_NAME",
    "KeyMismatchError",
    "LegacyLayoutError",
    "PutResult",
    "RecordConflictError",
    "RecordStore",
    "content_hash",
    "create_schema",
    "id_key",
    "id_str",
    "legacy_files",
    "logit_digest",
]

log = logging.getLogger(__name__)

DB_NAME = "records.sqlite3"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS records(rid INTEGER PRIMARY KEY, id BLOB NOT NULL, "
    "sha256 BLOB NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL, stored_at REAL NOT NULL, "
    "expires_at REAL, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS versions(vid INTEGER PRIMARY KEY, version TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS logits(vid INTEGER NOT NULL, rid INTEGER NOT NULL, "
    "digest BLOB NOT NULL, data BLOB NOT NULL, PRIMARY KEY (vid, rid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS retired(id BLOB PRIMARY KEY) WITHOUT ROWID",
)
INSERT_RECORD = (
    "INSERT INTO records(rid, id, sha256, dtype, shape, stored_at, expires_at, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_LOGITS = "INSERT OR REPLACE INTO logits(vid, rid, digest, data) VALUES (?, ?, ?, ?)"
_LEGACY = ("records", "logits", "records.rekey", "KEY", "REKEY", "RETIRED")


class RecordConflictError(Exception):
    """An id of the batch (at ``index``) is stored with different content (no ``replace``)."""

    def __init__(self, index: int) -> None:
        super().__init__(
            f"record {index}: this sample id is already stored with different content "
            "(send it with replace to overwrite it)"
        )
        self.index = index


class KeyMismatchError(ValueError):
    """The store's records belong to another pseudonym key (fingerprints named)."""


class LegacyLayoutError(RuntimeError):
    """The directory still holds records in the one-file-per-record layout."""


@dataclass(frozen=True)
class PutResult:
    """How many records of a batch were new, replaced, or already stored identically."""

    stored: int
    replaced: int
    unchanged: int


def content_hash(x: np.ndarray) -> str:
    """SHA-256 over dtype, shape and the little-endian bytes of ``x``."""
    arr = np.ascontiguousarray(x)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.newbyteorder('<').str}|{arr.shape}|".encode())
    h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def id_key(sid: str) -> bytes:
    """The stored form of a pseudonym (see the module docstring); reversible by :func:`id_str`."""
    if len(sid) == 64:
        return bytes.fromhex(sid)
    raw = base64.b32decode(sid.upper() + "====")
    key = b"\x01" + raw
    return key if id_str(key) == sid else b"\x02" + sid.encode("ascii")  # non-canonical base32


def id_str(key: bytes) -> str:
    if len(key) == 32:
        return key.hex()
    if key[:1] == b"\x01":
        return base64.b32encode(key[1:]).decode("ascii").lower().rstrip("=")
    return key[1:].decode("ascii")


def logit_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def create_schema(con: sqlite3.Connection) -> None:
    """Create the tables if missing (inside the caller's transaction)."""
    for statement in _SCHEMA:
        con.execute(statement)
    con.execute("PRAGMA user_version=1")


def legacy_files(root: Path) -> list[Path]:
    """Files and folders of the one-file-per-record layout present under ``root``."""
    return [root / name for name in _LEGACY if (root / name).exists()]


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), MAX_PARAMS):
        yield values[start : start + MAX_PARAMS]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class RecordStore:
    """Durable live records of one owner (see the module docstring).

    Args:
        root: directory (created if missing) holding ``records.sqlite3``.
        key_fingerprint: fingerprint of the deployment's pseudonym key.
        retention_s: seconds a record is kept after it was stored; ``None`` keeps it.
    """

    def __init__(
        self, root: str | Path, key_fingerprint: str, *, retention_s: float | None = None
    ) -> None:
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention must be > 0 seconds, got {retention_s}")
        self.root = Path(root)
        self.path = self.root / DB_NAME
        self.retention_s = retention_s
        self._lock = threading.RLock()
        self._con = connect(self.path)
        self._rids: dict[str, int] = {}
        self._expiry: dict[str, float] = {}
        self._vids: dict[str, int] = {}
        self._retired: frozenset[str] = frozenset()
        self._next_rid = 1
        self._data_version = -1
        try:
            with write_transaction(self._con, self.path) as con:
                create_schema(con)
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                if "key_fingerprint" not in meta and not legacy_files(self.root):
                    con.execute(
                        "INSERT INTO meta(key, value) VALUES ('key_fingerprint', ?)",
                        (key_fingerprint,),
                    )
                    meta["key_fingerprint"] = key_fingerprint
            self._check_layout(meta)
            stored = meta["key_fingerprint"]
            if stored != key_fingerprint:
                raise KeyMismatchError(
                    f"{self.root} holds records and logit caches of the pseudonym key with "
                    f"fingerprint {stored}, not of this key ({key_fingerprint}); they are not "
                    "served under another key. Re-key them with `jacfusion-fed owner rekey` "
                    "(old and new key), or move the workspace away"
                )
            self.key_fingerprint = key_fingerprint
            with self._reading():
                pass  # loads the id index
        except BaseException:
            self._con.close()
            raise

    def _check_layout(self, meta: Mapping[str, str]) -> None:
        leftovers = legacy_files(self.root)
        if not leftovers:
            return
        if "migrated_from_files" not in meta:
            raise LegacyLayoutError(
                f"{self.root} holds live records in the old one-file-per-record layout; "
                "migrate them with `jacfusion-fed owner migrate-store --workspace WS "
                "--pseudonym-key KEY` (starting the owner does it too)"
            )
        for p in leftovers:  # a migration interrupted after its commit: finish the cleanup
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    # --- the in-memory index -------------------------------------------------------------

    def _sync(self) -> None:
        """Reload the id index when another connection committed (``PRAGMA data_version``)."""
        version = self._con.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        con = self._con
        rids: dict[str, int] = {}
        expiry: dict[str, float] = {}
        top = 0
        for rid, key, expires in con.execute("SELECT rid, id, expires_at FROM records"):
            sid = id_str(key)
            rids[sid] = rid
            top = max(top, rid)
            if expires is not None:
                expiry[sid] = float(expires)
        self._rids, self._expiry, self._next_rid = rids, expiry, top + 1
        self._vids = dict(con.execute("SELECT version, vid FROM versions").fetchall())
        self._retired = frozenset(id_str(k) for (k,) in con.execute("SELECT id FROM retired"))
        self._data_version = version

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one snapshot) with the index brought up to date."""
        with self._lock:
            try:
                self._con.execute("BEGIN")
                try:
                    self._sync()
                    yield self._con
                finally:
                    self._con.execute("COMMIT")
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from exc

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._lock, write_transaction(self._con, self.path) as con:
            try:
                self._sync()
                yield con
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from exc

    # --- the key -------------------------------------------------------------------------

    @property
    def retired(self) -> frozenset[str]:
        """Pseudonyms of rotated-out keys (requests naming them are refused)."""
        return self._retired

    def rekey(
        self, mapping: Mapping[str, str], new_fingerprint: str, retire: Iterable[str] = ()
    ) -> tuple[int, int]:
        """Rename records ``old pseudonym -> new pseudonym`` and adopt ``new_fingerprint``.

        Records without a mapping are erased (they cannot be reached under the new key); every
        cached logit is dropped; the old ids (stored, already retired, and ``retire``) are
        retired. One transaction: after a crash the store is wholly old or wholly new.
        Returns ``(renamed, erased)``.
        """
        bad = [
            i
            for i, (a, b) in enumerate(mapping.items())
            if not (is_pseudonym(a) and is_pseudonym(b))
        ]
        if bad:
            raise ValueError(f"rekey mapping entry {bad[0]} is not a pair of pseudonyms")
        if len(set(mapping.values())) != len(mapping):
            raise ValueError("rekey mapping sends two old pseudonyms to the same new one")
        retire = list(retire)
        with self._lock:  # the commit and the in-memory index change as one
            with self._writing() as con:
                renames = [
                    (id_key(mapping[s]), rid) for s, rid in self._rids.items() if s in mapping
                ]
                gone = [rid for s, rid in self._rids.items() if s not in mapping]
                con.executemany("UPDATE records SET id = ? WHERE rid = ?", renames)
                for part in _chunks(gone):
                    con.execute(f"DELETE FROM records WHERE rid IN ({_marks(len(part))})", part)
                con.execute("DELETE FROM logits")
                con.execute("DELETE FROM versions")
                keep = (set(self._rids) | self._retired | set(retire)) - set(mapping.values())
                con.execute("DELETE FROM retired")
                con.executemany(
                    "INSERT OR IGNORE INTO retired(id) VALUES (?)", ((id_key(s),) for s in keep)
                )
                con.execute(
                    "UPDATE meta SET value = ? WHERE key = 'key_fingerprint'", (new_fingerprint,)
                )
            self.key_fingerprint = new_fingerprint
            self._data_version = -1  # our own commit: reload the index from the new rows
            with self._reading():
                pass
        self._erase_wal()
        return len(renames), len(gone)

    # --- records -------------------------------------------------------------------------

    def __contains__(self, sid: object) -> bool:
        """Whether ``sid`` is stored and not expired (an expired record is erased now)."""
        return isinstance(sid, str) and bool(self.held([sid]))

    def held(self, sids: Sequence[str]) -> list[str]:
        """Those of ``sids`` stored and not expired, in order; expired ones are erased now."""
        rids = self._rids
        if not self._expiry:
            return [s for s in sids if s in rids]
        now, expiry = time.time(), self._expiry
        out: list[str] = []
        expired: list[str] = []
        for s in sids:
            if s in rids:
                (out if expiry.get(s, now + 1) > now else expired).append(s)
        if expired:
            self._erase(expired)
        return out

    def __len__(self) -> int:
        return len(self._rids)

    def ids(self, *, purge: bool = True) -> list[str]:
        """Stored ids (sorted); with ``purge`` expired records are erased first."""
        if purge:
            self.purge_expired()
        with self._reading():
            return sorted(self._rids)

    def expires_at(self, sid: str) -> float | None:
        """When ``sid`` expires (Unix seconds), ``None`` when never."""
        return self._expiry.get(sid)

    def get(self, sid: str) -> np.ndarray | None:
        """The input stored for ``sid`` (``None`` when unknown or expired)."""
        if not is_pseudonym(sid):
            raise ValueError("a record id must be a pseudonym")
        return self.get_many([sid]).get(sid)

    def get_many(self, sids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored inputs of ``sids`` (unknown and expired ones left out; verified)."""
        out: dict[str, np.ndarray] = {}
        expired: list[str] = []
        now = time.time()
        with self._reading() as con:
            wanted = {self._rids[s]: s for s in sids if s in self._rids}
            rids = list(wanted)
            for part in _chunks(rids):
                rows = con.execute(
                    "SELECT rid, id, sha256, dtype, shape, expires_at, data FROM records "
                    f"WHERE rid IN ({_marks(len(part))})",
                    part,
                ).fetchall()
                for rid, key, sha, dtype, shape, expires, data in rows:
                    sid = wanted[rid]
                    if expires is not None and expires <= now:
                        expired.append(sid)
                        continue
                    out[sid] = self._decode(rid, sid, key, sha, dtype, shape, data)
        if expired:
            self._erase(expired)
        return out

    def _decode(
        self, rid: int, sid: str, key: bytes, sha: bytes, dtype: str, shape: str, data: bytes
    ) -> np.ndarray:
        where = f"{self.path} (record rid {rid})"
        try:
            dt = np.dtype(dtype)
            dims = tuple(int(d) for d in shape.split(",")) if shape else ()
            x = np.frombuffer(data, dtype=dt.newbyteorder("<")).reshape(dims)
        except (TypeError, ValueError) as exc:
            raise CorruptFileError(where, f"malformed record ({exc})") from exc
        if key != id_key(sid) or bytes.fromhex(content_hash(x)) != sha:
            raise CorruptFileError(where, "record content does not match its hash")
        return x.astype(dt.newbyteorder("="))

    def put(self, ids: Sequence[str], x: np.ndarray, *, replace: bool = False) -> PutResult:
        """Store ``x[i]`` under ``ids[i]`` (already validated against the input spec), in one
        transaction.

        Raises :class:`RecordConflictError` (nothing stored) when an id holds other content
        and ``replace`` is false; ``ValueError`` for a malformed batch (nothing stored).
        """
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} inputs")
        bad = next((i for i, s in enumerate(ids) if not is_pseudonym(s)), None)
        if bad is not None:
            raise ValueError(f"record {bad}: the sample id is not a pseudonym")
        if len(set(ids)) != len(ids):
            first: dict[str, int] = {}
            dup = next(i for i, s in enumerate(ids) if first.setdefault(s, i) != i)
            raise ValueError(f"record {dup}: duplicate sample id in the batch")
        arr = np.ascontiguousarray(x)
        le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        dtype, row_shape = le.dtype.str, tuple(arr.shape[1:])
        shape = ",".join(str(d) for d in row_shape)
        blob = memoryview(le.tobytes())
        n = len(ids)
        size = len(blob) // n if n else 0
        rows = [blob[i * size : (i + 1) * size] for i in range(n)]
        copy = hashlib.sha256(f"{dtype}|{row_shape}|".encode()).copy
        digests = []
        for row in rows:
            h = copy()
            h.update(row)
            digests.append(h.digest())
        now = time.time()
        expires = None if self.retention_s is None else now + self.retention_s
        with self._lock:  # the commit and the in-memory index change as one
            with self._writing() as con:
                old = [self._rids.get(s) for s in ids]
                known = [r for r in old if r is not None]
                shas: dict[int, bytes] = {}
                for part in _chunks(known):
                    q = f"SELECT rid, sha256 FROM records WHERE rid IN ({_marks(len(part))})"
                    shas.update(con.execute(q, part).fetchall())
                fresh = [i for i, r in enumerate(old) if r is None] if known else range(n)
                new = {ids[i]: self._next_rid + j for j, i in enumerate(fresh)}
                keys = [id_key(ids[i]) for i in fresh]
                inserts = zip(
                    new.values(),
                    keys,
                    [digests[i] for i in fresh],
                    repeat(dtype),
                    repeat(shape),
                    repeat(now),
                    repeat(expires),
                    [rows[i] for i in fresh],
                )
                updates: list[tuple[object, ...]] = []
                changed: dict[str, int] = {}
                for i, rid in enumerate(old):
                    if rid is not None and shas.get(rid) != digests[i]:
                        if not replace:
                            raise RecordConflictError(i)
                        updates.append((digests[i], dtype, shape, now, expires, rows[i], rid))
                        changed[ids[i]] = rid
                con.executemany(INSERT_RECORD, inserts)
                con.executemany(
                    "UPDATE records SET sha256 = ?, dtype = ?, shape = ?, stored_at = ?, "
                    "expires_at = ?, data = ? WHERE rid = ?",
                    updates,
                )
                self._drop_logits(con, list(changed.values()))
            self._rids.update(new)
            self._next_rid += len(new)
            if expires is not None:
                self._expiry.update(dict.fromkeys(new, expires))
                self._expiry.update(dict.fromkeys(changed, expires))
        if updates:
            self._erase_wal()  # replaced content leaves the WAL and the database file too
        return PutResult(len(new), len(updates), n - len(new) - len(updates))

    def _drop_logits(self, con: sqlite3.Connection, rids: Sequence[int]) -> None:
        for vid in self._vids.values():
            con.executemany(
                "DELETE FROM logits WHERE vid = ? AND rid = ?", ((vid, r) for r in rids)
            )

    def delete(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Erase the inputs and cached logits of ``ids``; returns ``(deleted, unknown)``.

        An expired record is erased too but reported unknown (it was no longer served).
        """
        with self._lock:
            now = time.time()
            held = [s for s in ids if s in self._rids]
            deleted = [s for s in held if self._expiry.get(s, now + 1) > now]
            self._erase(held)
        gone = set(deleted)
        return deleted, [s for s in ids if s not in gone]

    def _erase(self, sids: Sequence[str]) -> None:
        if not sids:
            return
        with self._lock:  # the commit and the in-memory index change as one
            with self._writing() as con:
                rids = [self._rids[s] for s in dict.fromkeys(sids) if s in self._rids]
                for part in _chunks(rids):
                    con.execute(f"DELETE FROM records WHERE rid IN ({_marks(len(part))})", part)
                self._drop_logits(con, rids)
            for sid in sids:
                self._rids.pop(sid, None)
                self._expiry.pop(sid, None)
        self._erase_wal()

    def _erase_wal(self) -> None:
        with self._lock:
            if not erase_wal(self._con, self.path):
                log.warning(
                    "%s: the WAL could not be truncated after an erasure (another process "
                    "reads the store); erased rows stay in the -wal file until the next one",
                    self.path,
                )

    def purge_expired(self) -> list[str]:
        """Erase every expired record; returns their ids."""
        if not self._expiry:
            return []
        now = time.time()
        with self._lock:
            due = [s for s, t in self._expiry.items() if t <= now]
            self._erase(due)
        return due

    # --- cached logits -------------------------------------------------------------------

    def cached_logits(self, version: str, sid: str) -> np.ndarray | None:
        """The logits cached for ``sid`` under model ``version``, if any (verified)."""
        return self.cached_logits_many(version, [sid]).get(sid)

    def cached_logits_many(self, version: str, sids: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached logits of those ``sids`` that have some under ``version`` (verified)."""
        out: dict[str, np.ndarray] = {}
        with self._reading() as con:
            vid = self._vids.get(version)
            if vid is None:
                return out
            wanted = {self._rids[s]: s for s in sids if s in self._rids}
            rids = list(wanted)
            for part in _chunks(rids):
                rows = con.execute(
                    "SELECT rid, digest, data FROM logits WHERE vid = ? AND rid IN "
                    f"({_marks(len(part))})",
                    (vid, *part),
                ).fetchall()
                for rid, digest, data in rows:
                    if logit_digest(data) != digest:
                        raise CorruptFileError(
                            f"{self.path} (logits of rid {rid}, version {version})",
                            "cached logits do not match their digest",
                        )
                if rows and len({len(r[2]) for r in rows}) == 1:  # one copy, rows are views
                    table = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f8")
                    matrix = table.astype(np.float64).reshape(len(rows), -1)
                    out.update(zip((wanted[r[0]] for r in rows), matrix, strict=True))
                else:
                    for rid, _, data in rows:
                        out[wanted[rid]] = np.frombuffer(data, dtype="<f8").astype(np.float64)
        return out

    def save_logits(self, version: str, sid: str, logits: np.ndarray) -> None:
        """Cache ``sid``'s logits under ``version`` (only while the record is stored)."""
        self.save_logits_many(version, {sid: logits})

    def save_logits_many(self, version: str, values: Mapping[str, np.ndarray]) -> None:
        """Cache logits under ``version`` in one transaction (ids no longer stored skipped:
        an erased record's logits are never resurrected)."""
        with self._lock:  # the commit and the in-memory index change as one
            with self._writing() as con:
                vid = self._vids.get(version)
                if vid is None:
                    cur = con.execute("INSERT INTO versions(version) VALUES (?)", (version,))
                    vid = int(cur.lastrowid or 0)
                rows = []
                for sid, row in values.items():
                    rid = self._rids.get(sid)
                    if rid is not None:
                        data = np.ascontiguousarray(row, dtype="<f8").tobytes()
                        rows.append((vid, rid, logit_digest(data), data))
                con.executemany(INSERT_LOGITS, rows)
            self._vids[version] = vid
