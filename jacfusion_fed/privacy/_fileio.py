"""Atomic writes of secret and public files (kept local so privacy depends on nothing else)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def write_file_atomic(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode`` permissions.

    The temporary file is created with ``mode`` from the start (``O_EXCL``; the umask can only
    remove bits, and ``fchmod`` sets them exactly), fsynced, renamed over ``path`` and the
    directory fsynced, so a secret is never readable by others, even for an instant.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and restrict it to its owner (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def check_private_file(path: Path) -> None:
    """Raise ``PermissionError`` if ``path`` is readable or writable by group or others."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path} has permissions {mode:04o}; a secret must be owner-only "
            f"(run: chmod 600 {path})"
        )
