"""An owner's live records (sent by requesters with ``PutRecords``) and their logits.

Wraps the durable :class:`~jacfusion_fed.store.RecordStore` with what the serving hot path
needs: an in-memory set of the stored ids with their expiry times (membership is a set
lookup), an in-memory logit cache per model version in front of the store's per-record cache,
and the pseudonyms retired by a key rotation (refused with :class:`RetiredPseudonymError`).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jacfusion_fed.store.atomic import read_envelope_meta, read_verified, write_verified
from jacfusion_fed.store.record_store import PutResult, RecordStore

__all__ = ["LiveRecords", "RetiredPseudonymError"]


class RetiredPseudonymError(LookupError):
    """A requested id is a pseudonym of a rotated-out key (``index`` is its position)."""

    def __init__(self, index: int) -> None:
        super().__init__(
            f"sample id at position {index} is a pseudonym of a retired key (the owner's key "
            "was rotated); derive the ids with the current pseudonym key"
        )
        self.index = index


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    return dt.datetime.fromisoformat(value).timestamp()


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
        self.store = RecordStore(root, key_fingerprint, retention_s=retention_s)
        self._lock = threading.Lock()
        self._expires: dict[str, float | None] = {}
        for sid in self.store.ids():
            path = self.store.root / "records" / f"{sid}.rec"
            self._expires[sid] = _timestamp(read_envelope_meta(path).get("expires_at"))
        self._any_expiry = any(t is not None for t in self._expires.values())
        self._memo: dict[str, dict[str, np.ndarray]] = {}
        self._retired_path = self.store.root / "RETIRED"
        self.retired: frozenset[str] = frozenset()
        if self._retired_path.exists():
            payload, _ = read_verified(self._retired_path)
            self.retired = frozenset(json.loads(payload.decode("utf-8")))

    def __contains__(self, sid: object) -> bool:
        return sid in self._expires

    def __len__(self) -> int:
        return len(self._expires)

    def check_not_retired(self, ids: Sequence[str]) -> None:
        if self.retired:
            for i, sid in enumerate(ids):
                if sid in self.retired:
                    raise RetiredPseudonymError(i)

    def _forget(self, sids: Sequence[str]) -> None:
        with self._lock:
            for sid in sids:
                self._expires.pop(sid, None)
                for table in self._memo.values():
                    table.pop(sid, None)

    def expire(self) -> list[str]:
        """Erase the records whose retention ran out; returns their ids."""
        if self.store.retention_s is None and not self._any_expiry:
            return []  # nothing can expire (no retention now, none stored before)
        now = time.time()
        due = [s for s, t in list(self._expires.items()) if t is not None and t <= now]
        if due:
            self.store.delete(due)
            self._forget(due)
        return due

    def put(self, ids: Sequence[str], x: np.ndarray, *, replace: bool = False) -> PutResult:
        """Store a validated batch (see :meth:`RecordStore.put`)."""
        self.check_not_retired(ids)
        self.expire()
        result = self.store.put(ids, x, replace=replace)
        self._forget(ids)  # replaced ones must not answer from the memo
        with self._lock:
            for sid in ids:
                path = self.store.root / "records" / f"{sid}.rec"
                self._expires[sid] = _timestamp(read_envelope_meta(path).get("expires_at"))
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
        out: dict[str, np.ndarray] = {}
        todo: list[tuple[str, np.ndarray]] = []
        with self._lock:
            if version not in self._memo and len(self._memo) >= 2:  # keep the newest versions
                self._memo.pop(next(iter(self._memo)))
            memo = self._memo.setdefault(version, {})
        for sid in ids:
            if sid not in self._expires:
                continue
            row = memo.get(sid) if cache else None
            if row is None and cache:
                row = self.store.cached_logits(version, sid)
            if row is not None:
                out[sid] = row
                continue
            x = self.store.get(sid)
            if x is None:  # erased meanwhile
                self._forget([sid])
                continue
            todo.append((sid, x))
        if todo:
            values = forward(np.stack([x for _, x in todo]))
            for (sid, _), row in zip(todo, values, strict=True):
                out[sid] = row
                if cache:
                    self.store.save_logits(version, sid, row)
                    with self._lock:
                        if sid in self._expires:
                            memo[sid] = row
        return out

    def rekey(
        self, mapping: Mapping[str, str], new_fingerprint: str, retired: Sequence[str]
    ) -> tuple[int, int]:
        """Re-key the stored records (see :meth:`RecordStore.rekey`) and retire ``retired``
        (the old key's pseudonyms: refused from now on). Returns ``(renamed, erased)``."""
        old = set(self._expires) | set(self.retired) | set(retired)
        renamed, erased = self.store.rekey(mapping, new_fingerprint)
        keep = old - set(mapping.values())
        payload = json.dumps(sorted(keep)).encode("utf-8")
        write_verified(self._retired_path, payload, {"kind": "retired-pseudonyms"})
        self.retired = frozenset(keep)
        with self._lock:
            self._memo.clear()
            self._expires = {
                sid: _timestamp(
                    read_envelope_meta(self.store.root / "records" / f"{sid}.rec").get("expires_at")
                )
                for sid in self.store.ids()
            }
        return renamed, erased
