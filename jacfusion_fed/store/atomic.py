"""Crash-safe file writes and a hash-verified file envelope.

:func:`atomic_write_bytes` writes to a temporary file in the target's directory, fsyncs it,
renames it over the target and fsyncs the directory: after a crash the target holds either
the old or the new content, never a mix. A crash between write and rename may leave a
``.<name>.<random>.tmp`` file behind; readers ignore such files and
:func:`remove_stale_temp_files` deletes them.

Verified envelope (:func:`write_verified` / :func:`read_verified`)::

    b"JFENV001"                      8-byte magic
    header length                    8 bytes, unsigned big-endian
    header                           UTF-8 JSON: {"meta": {...}, "payload_size": n}
    payload                          n bytes
    SHA-256                          32 bytes over everything above

Any truncation, bit flip or foreign file raises :class:`CorruptFileError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jacfusion_fed.atomicio import TMP_SUFFIX, atomic_write_bytes, fsync_dir

__all__ = [
    "ENVELOPE_MAGIC",
    "CorruptFileError",
    "atomic_write_bytes",
    "canonical_json",
    "fsync_dir",
    "read_envelope_meta",
    "read_verified",
    "remove_stale_temp_files",
    "write_verified",
]

ENVELOPE_MAGIC = b"JFENV001"
_LEN = struct.Struct(">Q")
_DIGEST_BYTES = 32
_MAX_HEADER_BYTES = 64 * 1024 * 1024


class CorruptFileError(Exception):
    """A stored file is truncated, corrupted, or not what it claims to be."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON (sorted keys, no whitespace, UTF-8, NaN/inf rejected)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left by interrupted :func:`atomic_write_bytes` calls.

    Only call this while no other process writes into ``directory``.
    """
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _encode(payload: bytes, meta: Mapping[str, Any] | None) -> bytes:
    header = canonical_json({"meta": dict(meta or {}), "payload_size": len(payload)})
    body = b"".join((ENVELOPE_MAGIC, _LEN.pack(len(header)), header, payload))
    return body + hashlib.sha256(body).digest()


def write_verified(
    path: str | os.PathLike[str],
    payload: bytes,
    meta: Mapping[str, Any] | None = None,
    *,
    mode: int = 0o644,
) -> str:
    """Atomically write ``payload`` and JSON ``meta`` in a verified envelope.

    Returns the hex SHA-256 of the payload.
    """
    atomic_write_bytes(path, _encode(payload, meta), mode=mode)
    return hashlib.sha256(payload).hexdigest()


def _parse_header(path: Path, blob: bytes, total: int) -> tuple[dict[str, Any], int, int]:
    """Return (header, payload_start, payload_size) from the first bytes of an envelope."""
    fixed = len(ENVELOPE_MAGIC) + _LEN.size
    if total < fixed + _DIGEST_BYTES or len(blob) < fixed:
        raise CorruptFileError(path, f"truncated ({total} bytes is shorter than an envelope)")
    if blob[: len(ENVELOPE_MAGIC)] != ENVELOPE_MAGIC:
        raise CorruptFileError(path, "not a jacfusion verified file (bad magic)")
    (header_len,) = _LEN.unpack_from(blob, len(ENVELOPE_MAGIC))
    if header_len > _MAX_HEADER_BYTES or fixed + header_len + _DIGEST_BYTES > total:
        raise CorruptFileError(path, f"truncated or corrupt header length {header_len}")
    if len(blob) < fixed + header_len:
        raise CorruptFileError(path, "truncated header")
    try:
        header = json.loads(blob[fixed : fixed + header_len].decode("utf-8"))
        size = int(header["payload_size"])
        if not isinstance(header.get("meta"), dict):
            raise ValueError("meta is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(path, f"unreadable header ({exc})") from exc
    return header, fixed + header_len, size


def read_verified(path: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any]]:
    """Read and verify an envelope; return ``(payload, meta)``.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptFileError: truncated, modified, or not an envelope (the message names the
            file and the problem).
    """
    p = Path(path)
    data = p.read_bytes()
    if len(data) < _DIGEST_BYTES:
        raise CorruptFileError(p, f"truncated ({len(data)} bytes)")
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    header, start, size = _parse_header(p, body, len(data))
    if start + size != len(body):
        raise CorruptFileError(
            p, f"truncated or padded: payload should be {size} bytes, found {len(body) - start}"
        )
    if hashlib.sha256(body).digest() != digest:
        raise CorruptFileError(p, "SHA-256 mismatch (file corrupted or modified)")
    return body[start:], header["meta"]


def read_envelope_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read only the header's ``meta`` of an envelope, *without* verifying the hash.

    For cheap listings; never act on the result without a later :func:`read_verified`.
    """
    p = Path(path)
    total = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(len(ENVELOPE_MAGIC) + _LEN.size)
        if len(head) == len(ENVELOPE_MAGIC) + _LEN.size and head.startswith(ENVELOPE_MAGIC):
            (header_len,) = _LEN.unpack_from(head, len(ENVELOPE_MAGIC))
            head += fh.read(min(header_len, _MAX_HEADER_BYTES))
    header, _, _ = _parse_header(p, head, total)
    meta: dict[str, Any] = header["meta"]
    return meta
