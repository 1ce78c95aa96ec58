"""What a head-registry backend stores: sealed entries, and the backend protocol.

Shared by the SQLite backend (:mod:`jacfusion_fed.store.registry_backends`) and the PostgreSQL
one (:mod:`jacfusion_fed.store.registry_postgres`), so neither imports the other's module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from jacfusion_fed.store.atomic import CorruptFileError, canonical_json

__all__ = ["RegistryBackend", "StoredEntry", "seal", "verified"]


def seal(meta_json: str, payload: bytes) -> bytes:
    """The SHA-256 stored with an entry: over its metadata JSON, a zero byte, its payload."""
    return hashlib.sha256(meta_json.encode("utf-8") + b"\x00" + payload).digest()


@dataclass(frozen=True)
class StoredEntry:
    """One registration as stored (the registry parses ``meta`` and ``payload``)."""

    modality: str
    sequence: int
    meta: dict[str, Any]
    payload: bytes

    def meta_json(self) -> str:
        return canonical_json(self.meta).decode("utf-8")

    def row(self) -> tuple[str, int, str, bytes, bytes]:
        """``(modality, sequence, meta, payload, sha256)`` as a backend stores it."""
        meta_json = self.meta_json()
        return self.modality, self.sequence, meta_json, self.payload, seal(meta_json, self.payload)


def verified(location: str, row: tuple[Any, ...]) -> StoredEntry:
    """An entry from a ``(modality, sequence, meta, payload, sha256)`` row, checked."""
    modality, sequence, meta_json, payload, digest = row
    where = f"{location} entry {modality}/{int(sequence):08d}"
    payload = bytes(payload)
    if seal(meta_json, payload) != bytes(digest):
        raise CorruptFileError(where, "SHA-256 mismatch (entry corrupted or modified)")
    try:
        meta = json.loads(meta_json)
    except ValueError as exc:  # pragma: no cover - the digest matched: only a foreign writer
        raise CorruptFileError(where, f"unreadable metadata ({exc})") from exc
    return StoredEntry(str(modality), int(sequence), meta, payload)


@runtime_checkable
class RegistryBackend(Protocol):
    """Storage of registry entries (see the module docstring)."""

    #: Where the entries live, for messages (a path, or a URI without its password).
    location: str

    def modalities(self) -> list[str]:
        """Modalities with at least one entry, sorted."""

    def entries(self, modality: str, *, latest: bool = False) -> list[StoredEntry]:
        """Verified entries of ``modality`` by sequence (only the newest with ``latest``)."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """One registration at a time across processes; raises ``TimeoutError`` when the
        lock is not had within the backend's lock timeout."""

    def append(self, entry: StoredEntry) -> None:
        """Add ``entry`` (inside :meth:`exclusive`); its sequence must be new."""

    def close(self) -> None: ...
