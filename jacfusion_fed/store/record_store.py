"""Live records of one owner (inputs sent with ``PutRecords``), keyed by pseudonym.

Layout under ``root``::

    KEY                              verified envelope: fingerprint of the pseudonym key
    records/<pseudonym>.rec          verified envelope: one input (raw little-endian bytes)
    logits/<version>/<pseudonym>.z   verified envelope: its K float64 logits under <version>

A record's header holds dtype, shape, the SHA-256 of its content, when it was stored and when
it expires (``retention_s`` after storing, or never). Writes are atomic and reads verified
(:mod:`jacfusion_fed.store.atomic`), so every record survives a restart whole or not at all.

Semantics (what ``PutRecords`` / ``DeleteRecords`` promise):

* the same id with the same content is a no-op; different content raises
  :class:`RecordConflictError` unless ``replace``, which also drops that id's cached logits;
* :meth:`RecordStore.put` checks every id of a batch before it writes any (a conflict anywhere
  stores nothing);
* :meth:`RecordStore.delete` removes the input and every cached logit of the id; an expired
  record is deleted the same way the next time anything reads or lists it.

Pseudonyms and caches belong to one key: a store opened with another key's fingerprint raises
:class:`KeyMismatchError` (rotate with :meth:`RecordStore.rekey`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jacfusion_fed.privacy.pseudonyms import is_pseudonym
from jacfusion_fed.store.atomic import (
    CorruptFileError,
    read_verified,
    remove_stale_temp_files,
    write_verified,
)

__all__ = ["KeyMismatchError", "PutResult", "RecordConflictError", "RecordStore", "content_hash"]


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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class RecordStore:
    """Durable live records of one owner (see the module docstring).

    Args:
        root: directory (created if missing).
        key_fingerprint: fingerprint of the deployment's pseudonym key.
        retention_s: seconds a record is kept after it was stored; ``None`` keeps it.
    """

    def __init__(
        self, root: str | Path, key_fingerprint: str, *, retention_s: float | None = None
    ) -> None:
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention must be > 0 seconds, got {retention_s}")
        self.root = Path(root)
        self._records = self.root / "records"
        self._logits = self.root / "logits"
        for d in (self._records, self._logits):
            d.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(d)
        self.retention_s = retention_s
        self._lock = threading.RLock()
        self.key_fingerprint = key_fingerprint
        self._finish_rekey()
        self._records.mkdir(exist_ok=True)
        self._check_key(key_fingerprint)

    # --- the key -------------------------------------------------------------------------

    def _check_key(self, fingerprint: str) -> None:
        path = self.root / "KEY"
        if not path.exists():
            write_verified(path, b"", {"kind": "key", "fingerprint": fingerprint})
            return
        _, meta = read_verified(path)
        stored = meta.get("fingerprint")
        if stored != fingerprint:
            raise KeyMismatchError(
                f"{self.root} holds records and logit caches of the pseudonym key with "
                f"fingerprint {stored}, not of this key ({fingerprint}); they are not served "
                "under another key. Re-key them with `jacfusion-fed owner rekey` (old and new "
                "key), or move the workspace away"
            )

    def rekey(self, mapping: Mapping[str, str], new_fingerprint: str) -> tuple[int, int]:
        """Rename records ``old pseudonym -> new pseudonym`` and adopt ``new_fingerprint``.

        Records without a mapping are erased (they cannot be reached under the new key); every
        cached logit is dropped. Returns ``(renamed, erased)``.
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
        with self._lock:
            renamed = erased = 0
            staged = self.root / "records.rekey"
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir()
            for sid in self.ids(purge=False):
                if sid in mapping:
                    payload, meta = read_verified(self._record_path(sid))
                    write_verified(
                        staged / f"{mapping[sid]}.rec", payload, meta | {"id": mapping[sid]}
                    )
                    renamed += 1
                else:
                    erased += 1
            # Commit point: once REKEY exists the switch is completed, also after a crash (by
            # the next open); before it, the staged copy is discarded and nothing changed.
            write_verified(
                self.root / "REKEY", b"", {"kind": "rekey", "fingerprint": new_fingerprint}
            )
            self._finish_rekey()
        return renamed, erased

    def _finish_rekey(self) -> None:
        """Complete an interrupted or current rotation (idempotent; see :meth:`rekey`)."""
        journal, staged = self.root / "REKEY", self.root / "records.rekey"
        if not journal.exists():
            shutil.rmtree(staged, ignore_errors=True)  # crashed before the commit point
            return
        _, meta = read_verified(journal)
        shutil.rmtree(self._logits, ignore_errors=True)
        if staged.exists():
            shutil.rmtree(self._records, ignore_errors=True)
            staged.rename(self._records)
        self._logits.mkdir(exist_ok=True)
        write_verified(self.root / "KEY", b"", {"kind": "key", "fingerprint": meta["fingerprint"]})
        self.key_fingerprint = str(meta["fingerprint"])
        journal.unlink()

    # --- records -------------------------------------------------------------------------

    def _record_path(self, sid: str) -> Path:
        if not is_pseudonym(sid):
            raise ValueError("a record id must be a pseudonym")
        return self._records / f"{sid}.rec"

    def _read(self, sid: str) -> tuple[np.ndarray, dict[str, object]] | None:
        path = self._record_path(sid)
        try:
            payload, meta = read_verified(path)
        except FileNotFoundError:
            return None
        expires = meta.get("expires_at")
        if isinstance(expires, str) and dt.datetime.fromisoformat(expires) <= _now():
            self._erase(sid)
            return None
        try:
            dtype = np.dtype(str(meta["dtype"]))
            shape = tuple(int(d) for d in meta["shape"])
            x = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(path, f"malformed record ({exc})") from exc
        if content_hash(x) != meta.get("sha256"):
            raise CorruptFileError(path, "record content does not match its hash")
        return x.astype(dtype.newbyteorder("=")), meta

    def get(self, sid: str) -> np.ndarray | None:
        """The input stored for ``sid`` (``None`` when unknown or expired)."""
        with self._lock:
            found = self._read(sid)
        return None if found is None else found[0]

    def __contains__(self, sid: object) -> bool:
        return isinstance(sid, str) and is_pseudonym(sid) and self.get(sid) is not None

    def ids(self, *, purge: bool = True) -> list[str]:
        """Stored ids (sorted); with ``purge`` expired records are erased first."""
        if purge:
            self.purge_expired()
        return sorted(p.stem for p in self._records.glob("*.rec") if is_pseudonym(p.stem))

    def put(self, ids: Sequence[str], x: np.ndarray, *, replace: bool = False) -> PutResult:
        """Store ``x[i]`` under ``ids[i]`` (already validated against the input spec).

        Raises :class:`RecordConflictError` (nothing stored) when an id holds other content
        and ``replace`` is false; ``ValueError`` for a malformed batch (nothing stored).
        """
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} inputs")
        bad = next((i for i, s in enumerate(ids) if not is_pseudonym(s)), None)
        if bad is not None:
            raise ValueError(f"record {bad}: the sample id is not a pseudonym")
        if len(set(ids)) != len(ids):
            dup = next(i for i, s in enumerate(ids) if ids.index(s) != i)
            raise ValueError(f"record {dup}: duplicate sample id in the batch")
        hashes = [content_hash(row) for row in x]
        with self._lock:
            existing = [self._read(sid) for sid in ids]
            for i, found in enumerate(existing):  # the whole batch is checked before writing
                if found is not None and found[1].get("sha256") != hashes[i] and not replace:
                    raise RecordConflictError(i)
            stored = replaced = unchanged = 0
            now = _now()
            expires = (
                None if self.retention_s is None else now + dt.timedelta(seconds=self.retention_s)
            )
            for i, sid in enumerate(ids):
                found = existing[i]
                if found is not None and found[1].get("sha256") == hashes[i]:
                    unchanged += 1
                    continue
                row = np.ascontiguousarray(x[i])
                meta = {
                    "kind": "record",
                    "id": sid,
                    "dtype": row.dtype.newbyteorder("<").str,
                    "shape": list(row.shape),
                    "sha256": hashes[i],
                    "stored_at": now.isoformat(),
                    "expires_at": None if expires is None else expires.isoformat(),
                }
                if found is not None:
                    self._drop_logits(sid)  # replaced: its cached logits are stale
                    replaced += 1
                else:
                    stored += 1
                write_verified(
                    self._record_path(sid), row.astype(row.dtype.newbyteorder("<")).tobytes(), meta
                )
        return PutResult(stored, replaced, unchanged)

    def delete(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Erase the inputs and cached logits of ``ids``; returns ``(deleted, unknown)``."""
        deleted, unknown = [], []
        with self._lock:
            for sid in ids:
                if self._read(sid) is None:
                    unknown.append(sid)
                else:
                    self._erase(sid)
                    deleted.append(sid)
        return deleted, unknown

    def _erase(self, sid: str) -> None:
        self._drop_logits(sid)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(sid).unlink()

    def purge_expired(self) -> list[str]:
        """Erase every expired record; returns their ids."""
        if self.retention_s is None and not any(self._records.iterdir()):
            return []
        gone = []
        with self._lock:
            for p in list(self._records.glob("*.rec")):
                if is_pseudonym(p.stem) and self._read(p.stem) is None:
                    gone.append(p.stem)
        return gone

    # --- cached logits -------------------------------------------------------------------

    def _logit_path(self, version: str, sid: str) -> Path:
        return self._logits / version / f"{sid}.z"

    def _drop_logits(self, sid: str) -> None:
        for d in self._logits.iterdir():
            with contextlib.suppress(FileNotFoundError):
                (d / f"{sid}.z").unlink()

    def cached_logits(self, version: str, sid: str) -> np.ndarray | None:
        """The logits cached for ``sid`` under model ``version``, if any (verified)."""
        try:
            payload, _ = read_verified(self._logit_path(version, sid))
        except FileNotFoundError:
            return None
        return np.frombuffer(payload, dtype="<f8").astype(np.float64)

    def save_logits(self, version: str, sid: str, logits: np.ndarray) -> None:
        """Cache ``sid``'s logits under ``version`` (only while the record is stored)."""
        with self._lock:
            if not self._record_path(sid).exists():
                return  # deleted meanwhile: never resurrect its logits
            path = self._logit_path(version, sid)
            path.parent.mkdir(exist_ok=True)
            data = np.ascontiguousarray(logits, dtype="<f8").tobytes()
            write_verified(path, data, {"kind": "record-logits", "version": version, "id": sid})
