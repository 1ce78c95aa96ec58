"""Damage and copy head-registry entries in place (as a bad disk or a stray writer would), for
the tests that check such entries are refused. The registry is SQLite here (a registry
directory ``DIR`` is ``DIR/registry.sqlite3``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from jacfusion_fed.store.registry_backends import REGISTRY_DB


def registry_db(registry_dir: Path) -> Path:
    return registry_dir / REGISTRY_DB


def flip_entry(registry_dir: Path, modality: str, sequence: int | None = None) -> bytes:
    """Flip one bit of an entry's payload (the newest when ``sequence`` is None); returns the
    original payload for :func:`restore_entry`."""
    con = sqlite3.connect(registry_db(registry_dir))
    try:
        if sequence is None:
            sequence = con.execute(
                "SELECT max(sequence) FROM heads WHERE modality = ?", (modality,)
            ).fetchone()[0]
        (payload,) = con.execute(
            "SELECT payload FROM heads WHERE modality = ? AND sequence = ?", (modality, sequence)
        ).fetchone()
        data = bytearray(payload)
        data[-40] ^= 0x01
        con.execute(
            "UPDATE heads SET payload = ? WHERE modality = ? AND sequence = ?",
            (bytes(data), modality, sequence),
        )
        con.commit()
    finally:
        con.close()
    return bytes(payload)


def restore_entry(registry_dir: Path, modality: str, sequence: int, payload: bytes) -> None:
    con = sqlite3.connect(registry_db(registry_dir))
    con.execute(
        "UPDATE heads SET payload = ? WHERE modality = ? AND sequence = ?",
        (payload, modality, sequence),
    )
    con.commit()
    con.close()


def copy_entry(registry_dir: Path, modality: str, sequence: int, to_modality: str) -> None:
    """Copy a valid entry (its digest included) under another modality's name."""
    con = sqlite3.connect(registry_db(registry_dir))
    con.execute(
        "INSERT INTO heads(modality, sequence, meta, payload, sha256) SELECT ?, sequence, meta, "
        "payload, sha256 FROM heads WHERE modality = ? AND sequence = ?",
        (to_modality, modality, sequence),
    )
    con.commit()
    con.close()
