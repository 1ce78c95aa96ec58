"""Owner-only files and folders for keys and certificates."""

from __future__ import annotations

import os
from pathlib import Path

from jacfusion_fed.atomicio import atomic_write_bytes

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def write_file_atomic(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode`` permissions (0600 default):
    the temporary file has ``mode`` from the start, so a secret is never readable by others."""
    atomic_write_bytes(path, data, mode=mode)


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
