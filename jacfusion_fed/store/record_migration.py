"""Move an owner's live records from the one-file-per-record layout into ``records.sqlite3``.

The old layout under the record store's directory (``<workspace>/live``)::

    KEY                              verified envelope: fingerprint of the pseudonym key
    records/<pseudonym>.rec          verified envelope: one input
    logits/<version>/<pseudonym>.z   verified envelope: its K float64 logits
    RETIRED                          verified envelope: JSON list of retired pseudonyms
    REKEY, records.rekey/            a key rotation interrupted after its commit point

:func:`migrate_record_files` (``jacfusion-fed owner migrate-store``, and automatically when an
owner opens its live records):

1. completes an interrupted rotation exactly as the old store did on its next open;
2. reads and verifies every record, every cached logit of an imported record, and the retired
   pseudonyms, inserting them in ONE transaction with the key's fingerprint and a
   ``migrated_from_files`` marker; a damaged file raises
   :class:`~jacfusion_fed.store.atomic.CorruptFileError` naming it, and nothing changes;
   expired records are dropped (they would be erased on their next read anyway);
3. only after that commit deletes the old files. A crash before the commit leaves the old
   files as they were (run it again); a crash after it leaves the marker, and the next open
   finishes the deletion. Running it twice is harmless.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jacfusion_fed.privacy.pseudonyms import is_pseudonym
from jacfusion_fed.store.atomic import (
    CorruptFileError,
    fsync_dir,
    read_verified,
    remove_stale_temp_files,
    write_verified,
)
from jacfusion_fed.store.record_store import (
    DB_NAME,
    INSERT_LOGITS,
    INSERT_RECORD,
    content_hash,
    create_schema,
    id_key,
    legacy_files,
    logit_digest,
)
from jacfusion_fed.store.sqlite_db import connect, erase_wal, write_transaction

__all__ = ["MigrationReport", "migrate_record_files"]


@dataclass(frozen=True)
class MigrationReport:
    """What one migration moved (``records`` imported, ``expired`` dropped)."""

    records: int
    logits: int
    retired: int
    expired: int
    seconds: float
    database: Path


def _finish_rekey(root: Path) -> None:
    """The old store's completion of an interrupted rotation (idempotent)."""
    journal, staged = root / "REKEY", root / "records.rekey"
    if not journal.exists():
        shutil.rmtree(staged, ignore_errors=True)  # crashed before the commit point
        return
    _, meta = read_verified(journal)
    shutil.rmtree(root / "logits", ignore_errors=True)
    if staged.exists():
        shutil.rmtree(root / "records", ignore_errors=True)
        staged.rename(root / "records")
    write_verified(root / "KEY", b"", {"kind": "key", "fingerprint": meta["fingerprint"]})
    journal.unlink()


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    return dt.datetime.fromisoformat(value).timestamp()


class _Importer:
    def __init__(self, root: Path, con: sqlite3.Connection) -> None:
        self.root, self.con = root, con
        self.rids: dict[str, int] = {}
        self.expired = 0

    def records(self) -> Iterator[tuple[object, ...]]:
        now = time.time()
        for path in sorted((self.root / "records").glob("*.rec")):
            sid = path.stem
            if not is_pseudonym(sid):
                continue
            payload, meta = read_verified(path)
            expires = _timestamp(meta.get("expires_at"))
            if expires is not None and expires <= now:
                self.expired += 1
                continue
            try:
                dtype = np.dtype(str(meta["dtype"])).newbyteorder("<")
                shape = tuple(int(d) for d in meta["shape"])
                x = np.frombuffer(payload, dtype=dtype).reshape(shape)
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptFileError(path, f"malformed record ({exc})") from exc
            digest = content_hash(x)
            if digest != meta.get("sha256"):
                raise CorruptFileError(path, "record content does not match its hash")
            rid = self.rids[sid] = len(self.rids) + 1
            stored = _timestamp(meta.get("stored_at")) or now
            dims = ",".join(str(d) for d in shape)
            sha = bytes.fromhex(digest)
            yield (rid, id_key(sid), sha, dtype.str, dims, stored, expires, payload)

    def logits(self) -> int:
        count = 0
        base = self.root / "logits"
        for vdir in sorted(base.iterdir()) if base.is_dir() else []:
            rows = []
            for path in sorted(vdir.glob("*.z")):
                rid = self.rids.get(path.stem)
                if rid is not None:
                    payload, _ = read_verified(path)
                    rows.append((rid, logit_digest(payload), payload))
            if rows:
                cur = self.con.execute("INSERT INTO versions(version) VALUES (?)", (vdir.name,))
                vid = int(cur.lastrowid or 0)
                self.con.executemany(INSERT_LOGITS, ((vid, *row) for row in rows))
                count += len(rows)
        return count

    def retired(self) -> int:
        path = self.root / "RETIRED"
        if not path.exists():
            return 0
        payload, _ = read_verified(path)
        ids = [s for s in json.loads(payload.decode("utf-8")) if is_pseudonym(s)]
        self.con.executemany(
            "INSERT OR IGNORE INTO retired(id) VALUES (?)", ((id_key(s),) for s in ids)
        )
        return len(ids)


def migrate_record_files(
    root: str | Path, key_fingerprint: str | None = None
) -> MigrationReport | None:
    """Migrate ``root`` (see the module docstring); ``None`` when there was nothing to do.

    ``key_fingerprint`` is used only for a store from before fingerprints (no ``KEY`` file);
    its cached logits, of an unknown key, are then dropped rather than imported.
    """
    root = Path(root)
    if not legacy_files(root):
        return None
    t0 = time.perf_counter()
    _finish_rekey(root)
    key = root / "KEY"
    fingerprint = str(read_verified(key)[1]["fingerprint"]) if key.exists() else key_fingerprint
    path = root / DB_NAME
    con = connect(path)
    try:
        counts = (0, 0, 0, 0)
        with write_transaction(con, path):
            create_schema(con)
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if "migrated_from_files" not in meta:
                if fingerprint is None:
                    raise ValueError(
                        f"{root} has no KEY file: pass the pseudonym key to migrate it"
                    )
                if con.execute("SELECT count(*) FROM records").fetchone()[0]:
                    raise ValueError(f"{path} already holds records; not merging old files in")
                importer = _Importer(root, con)
                con.executemany(INSERT_RECORD, importer.records())
                logits = importer.logits() if key.exists() else 0
                retired = importer.retired()
                counts = (len(importer.rids), logits, retired, importer.expired)
                report = json.dumps(dict(zip(_FIELDS, counts, strict=True)))
                con.execute("DELETE FROM meta")
                con.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [
                        ("key_fingerprint", fingerprint),
                        ("migrated_from_files", report),
                    ],
                )
        for p in legacy_files(root):  # after the commit only (see the module docstring)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        remove_stale_temp_files(root)
        fsync_dir(root)
        erase_wal(con, path)
    finally:
        con.close()
    return MigrationReport(*counts, seconds=time.perf_counter() - t0, database=path)


_FIELDS = ("records", "logits", "retired", "expired")
