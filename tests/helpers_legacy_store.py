"""Writes an owner's live records in the old one-file-per-record layout (what the releases
before the SQLite store left on disk), byte for byte as that store wrote them, so that the
migration is tested against the real format."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jacfusion_fed.store.atomic import write_verified
from jacfusion_fed.store.record_store import content_hash


def write_legacy_store(
    root: Path,
    fingerprint: str | None,
    records: Mapping[str, np.ndarray],
    *,
    logits: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    retired: Sequence[str] = (),
    expires_at: Mapping[str, dt.datetime] | None = None,
) -> None:
    """``root`` = the record store's directory (``<workspace>/live``)."""
    (root / "records").mkdir(parents=True, exist_ok=True)
    (root / "logits").mkdir(exist_ok=True)
    if fingerprint is not None:
        write_verified(root / "KEY", b"", {"kind": "key", "fingerprint": fingerprint})
    now = dt.datetime.now(dt.timezone.utc)
    for sid, x in records.items():
        row = np.ascontiguousarray(x)
        expires = (expires_at or {}).get(sid)
        meta = {
            "kind": "record",
            "id": sid,
            "dtype": row.dtype.newbyteorder("<").str,
            "shape": list(row.shape),
            "sha256": content_hash(row),
            "stored_at": now.isoformat(),
            "expires_at": None if expires is None else expires.isoformat(),
        }
        payload = row.astype(row.dtype.newbyteorder("<")).tobytes()
        write_verified(root / "records" / f"{sid}.rec", payload, meta)
    for version, table in (logits or {}).items():
        (root / "logits" / version).mkdir(exist_ok=True)
        for sid, values in table.items():
            data = np.ascontiguousarray(values, dtype="<f8").tobytes()
            meta = {"kind": "record-logits", "version": version, "id": sid}
            write_verified(root / "logits" / version / f"{sid}.z", data, meta)
    if retired:
        payload = json.dumps(sorted(retired)).encode("utf-8")
        write_verified(root / "RETIRED", payload, {"kind": "retired-pseudonyms"})


def files_containing(root: Path, needles: Mapping[str, bytes]) -> dict[str, list[str]]:
    """For each needle, the files under ``root`` (recursively) whose bytes contain it."""
    found: dict[str, list[str]] = {}
    blobs = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    for name, needle in needles.items():
        hits = [str(p.relative_to(root)) for p, blob in blobs.items() if needle in blob]
        if hits:
            found[name] = hits
    return found
