"""Content-addressed, hash-verified cache of generated arrays.

A cache file is one header line followed by an uncompressed ``.npz`` payload::

    JFCACHE1 <sha256 of the payload, hex>\\n<npz bytes>

Files are written atomically (temporary file in the same folder, ``fsync``, ``os.replace``), so
a reader sees either the old file or the new one, never a torn one.  A file whose payload does not
match its recorded hash is reported as corrupt and never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.atomicio import atomic_write_bytes

__all__ = [
    "CacheCorruptError",
    "content_key",
    "default_cache_dir",
    "file_lock",
    "read_arrays",
    "write_arrays",
]

_MAGIC = b"JFCACHE1 "


class CacheCorruptError(ValueError):
    """A cache file exists but its content does not match its recorded hash (or is unreadable)."""


def default_cache_dir() -> Path:
    """``$JACFUSION_CACHE`` when set, else ``~/.cache/jacfusion-fed``."""
    env = os.environ.get("JACFUSION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jacfusion-fed"


def content_key(params: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON form of ``params`` (sorted keys, no whitespace)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Atomically write ``arrays`` to ``path``; return the payload's SHA-256 (hex)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write_bytes(path, _MAGIC + digest.encode("ascii") + b"\n" + payload)
    return digest


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read a file written by :func:`write_arrays`, verifying its hash first.

    Raises ``FileNotFoundError`` when the file is missing and :class:`CacheCorruptError` when its
    header is malformed, its payload does not match the recorded hash, or it cannot be parsed.
    """
    data = Path(path).read_bytes()
    header, sep, payload = data.partition(b"\n")
    if not sep or not header.startswith(_MAGIC):
        raise CacheCorruptError(f"{path}: not a jacfusion cache file (bad header)")
    recorded = header[len(_MAGIC) :].decode("ascii", errors="replace")
    actual = hashlib.sha256(payload).hexdigest()
    if recorded != actual:
        raise CacheCorruptError(
            f"{path}: content hash mismatch (recorded {recorded[:12]}..., actual {actual[:12]}...)"
        )
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # hash matched but content unreadable: still corrupt
        raise CacheCorruptError(f"{path}: unreadable payload ({exc})") from exc


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` while the block runs (POSIX ``flock``).

    Best effort: where locking is unavailable (no ``fcntl``, read-only folder) the block runs
    unlocked, which is still safe because writes are atomic; it may only duplicate work.
    """
    lock_path = Path(str(path) + ".lock")
    try:
        import fcntl

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+b")  # noqa: SIM115 - held for the whole block
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # releases the lock
