"""An owner's live records (sent by requesters with ``PutRecords``) and their logits.

Wraps the durable :class:`~jacfusion_fed.store.record_store.RecordStore` (one SQLite database,
``live/records.sqlite3``) with what the serving hot path needs: membership is a lookup in the
store's in-memory id index, an in-memory logit cache per model version sits in front of the
store's per-record cache (batched reads and writes: one query per request), and pseudonyms
retired by a key rotation are refused with :class:`RetiredPseudonymError`.

A workspace still in the old one-file-per-record layout is migrated when its live records are
first opened (:func:`~jacfusion_fed.store.record_migration.migrate_record_files`, also
``jacfusion-fed owner migrate-store``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jacfusion_fed.store.record_migration import MigrationReport, migrate_record_files
from jacfusion_fed.store.record_store import PutResult, RecordStore

__all__ = ["LiveRecords", "RetiredPseudonymError"]

log = logging.getLogger(__name__)


class RetiredPseudonymError(LookupError):
    """A requested id is a pseudonym of a rotated-out key (``index`` is its position)."""

    def __init__(self, index: int) -> None:
        super().__init__(
            f"sample id at position {index} is a pseudonym of a retired key (the owner's key "
            "was rotated); derive the ids with the current pseudonym key"
        )
        self.index = index


class LiveRecords:
    """Live records of one owner (see the module docstring).

    Args:
        root: directory of the record store.
        key_fingerprint: the deployment key's fingerprint (a store of another key refuses).
        retention_s: seconds a record is kept; ``None`` keeps it until deleted.
    """

    def __init__(
        self, root: str | Path, key_fingerprint: str, *, retention_s: float | None = None
    ) -> None:
        self.migrated: MigrationReport | None = migrate_record_files(root, key_fingerprint)
        if self.migrated is not None:
            log.info(
                "migrated %d live record(s) and %d cached logit(s) into %s in %.1f s",
                self.migrated.records,
                self.migrated.logits,
                self.migrated.database,
                self.migrated.seconds,
            )
        self.store = RecordStore(root, key_fingerprint, retention_s=retention_s)
        self._lock = threading.Lock()
        self._memo: dict[str, dict[str, np.ndarray]] = {}

    @property
    def retired(self) -> frozenset[str]:
        return self.store.retired

    def __contains__(self, sid: object) -> bool:
        return sid in self.store

    def __len__(self) -> int:
        return len(self.store)

    def check_not_retired(self, ids: Sequence[str]) -> None:
        retired = self.store.retired
        if retired:
            for i, sid in enumerate(ids):
                if sid in retired:
                    raise RetiredPseudonymError(i)

    def _forget(self, sids: Sequence[str]) -> None:
        with self._lock:
            for table in self._memo.values():
                for sid in sids:
                    table.pop(sid, None)

    def expire(self) -> list[str]:
        """Erase the records whose retention ran out; returns their ids."""
        due = self.store.purge_expired()
        if due:
            self._forget(due)
        return due

    def put(self, ids: Sequence[str], x: np.ndarray, *, replace: bool = False) -> PutResult:
        """Store a validated batch (see :meth:`RecordStore.put`)."""
        self.check_not_retired(ids)
        self.expire()
        result = self.store.put(ids, x, replace=replace)
        if result.replaced:
            self._forget(ids)  # replaced ones must not answer from the memo
        return result

    def delete(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Erase inputs and cached logits; returns ``(deleted, unknown)``."""
        deleted, unknown = self.store.delete(ids)
        self._forget(ids)
        return deleted, unknown

    def logits(
        self,
        ids: Sequence[str],
        version: str,
        forward: Callable[[np.ndarray], np.ndarray],
        *,
        cache: bool = True,
    ) -> dict[str, np.ndarray]:
        """Logits under ``version`` of the stored ``ids`` (expired or unknown ones are left out).

        ``forward`` maps a stacked batch of inputs to (N, K) float64 logits; it runs only for
        records with no cached logits of this version (or always, with ``cache=False``).
        """
        self.expire()
        with self._lock:
            if version not in self._memo and len(self._memo) >= 2:  # keep the newest versions
                self._memo.pop(next(iter(self._memo)))
            memo = self._memo.setdefault(version, {})
        held = self.store.held(ids)
        out: dict[str, np.ndarray] = {}
        todo = held
        if cache:
            todo, get = [], memo.get
            for sid in held:  # one pass: the memo's rows, and what it lacks
                row = get(sid)
                if row is None:
                    todo.append(sid)
                else:
                    out[sid] = row
            if todo:
                stored = self.store.cached_logits_many(version, todo)
                out.update(stored)
                with self._lock:
                    memo.update(stored)
                todo = [sid for sid in todo if sid not in stored]
        if todo:
            inputs = self.store.get_many(todo)  # erased meanwhile: left out
            todo = [sid for sid in todo if sid in inputs]
        if todo:
            values = forward(np.stack([inputs[sid] for sid in todo]))
            fresh = dict(zip(todo, values, strict=True))
            out.update(fresh)
            if cache:
                self.store.save_logits_many(version, fresh)
                with self._lock:
                    memo.update((sid, row) for sid, row in fresh.items() if sid in self.store)
        return out

    def rekey(
        self, mapping: Mapping[str, str], new_fingerprint: str, retired: Sequence[str]
    ) -> tuple[int, int]:
        """Re-key the stored records and retire the old key's pseudonyms (``retired`` and
        every stored id), in one transaction (see :meth:`RecordStore.rekey`). Returns
        ``(renamed, erased)``."""
        renamed_erased = self.store.rekey(mapping, new_fingerprint, retired)
        with self._lock:
            self._memo.clear()
        return renamed_erased
