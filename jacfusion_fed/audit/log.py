"""The append-only, hash-chained audit log of one service (:class:`AuditLog`).

Writing an entry (:meth:`AuditLog.append`):

1. an exclusive ``flock`` on ``<log>.lock`` (the service and an operator's CLI command, e.g.
   ``owner import-model``, may append to the same log), then the chain's head is re-read from
   the file if another process appended or rotated since;
2. rotation when the file is due (:class:`Rotation`: size and/or age): a signed checkpoint
   ends the file, which is renamed ``<log>.NNNNNN``; the chain continues in a new ``<log>``;
3. one ``write`` of the canonical line (``O_APPEND``), then ``fdatasync`` (durability
   policy ``fsync="entry"``, the default: an entry the service acted on survives a power
   loss; ``fsync="checkpoint"`` only syncs at checkpoints, rotation and close, which survives
   a crash of the process but not of the machine);
4. every ``checkpoint_every`` entries, and every ``checkpoint_interval`` seconds while entries
   are waiting (:meth:`start`), a checkpoint signed with the service's TLS key.

A failed write (disk full, I/O error) raises :class:`AuditUnavailable` after cutting the file
back to its last complete line; the gRPC interceptor then answers ``UNAVAILABLE`` instead of
the response, so nothing is served unrecorded. :meth:`check_writable` is the cheap check
before a call runs: it refuses while the file system has less than ``reserve_bytes`` free.
A partial last line found on opening (a crash in the middle of a write, whose call was
therefore never answered) is cut off and the repair is itself logged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jacfusion_fed.atomicio import fsync_dir

from .chain import FORMAT_VERSION, GENESIS, seal, segment_path, segments, utc_now
from .signing import Signer, signed_bytes

__all__ = ["AuditLog", "AuditUnavailable", "FsyncPolicy", "Rotation"]

log = logging.getLogger(__name__)

FsyncPolicy = Literal["entry", "checkpoint"]
_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
}
_TIME_UNITS = frozenset({"s", "m", "h", "d"})
_READ_BLOCK = 1 << 16


class AuditUnavailable(RuntimeError):
    """The audit log cannot record an entry now (disk full, I/O error): refuse the call."""


@dataclass(frozen=True)
class Rotation:
    """When the log file is closed and a new one begun: at ``max_bytes``, after
    ``max_seconds`` since its first entry, or both (whichever comes first)."""

    max_bytes: int | None = None
    max_seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Rotation:
        """``64MiB``, ``500MB``, ``24h``, ``7d`` or both comma-separated (``64MiB,1d``);
        ``none`` for no rotation. ``ValueError`` naming the bad part otherwise."""
        max_bytes: int | None = None
        max_seconds: float | None = None
        if text.strip().lower() in ("", "none", "0"):
            return cls()
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", part)
            unit = match.group(2).lower() if match else ""
            if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
                raise ValueError(
                    f"audit rotation {part.strip()!r}: expected a size (e.g. 64MiB, 500MB) "
                    "or an age (e.g. 24h, 7d)"
                )
            value = float(match.group(1)) * _UNITS[unit]
            if unit in _TIME_UNITS:
                max_seconds = value
            else:
                max_bytes = int(value)
        return cls(max_bytes, max_seconds)


def _rfind_newline(fd: int, limit: int) -> int:
    """Offset of the last ``\\n`` before ``limit`` in an open file, or -1."""
    pos = limit
    while pos > 0:
        step = min(_READ_BLOCK, pos)
        pos -= step
        idx = os.pread(fd, step, pos).rfind(b"\n")
        if idx >= 0:
            return pos + idx
    return -1


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The last complete line of an open file (without ``\\n``) and the offset just after
    it (smaller than ``size`` when the file ends in a partial line)."""
    end = _rfind_newline(fd, size)
    if end < 0:
        return b"", 0
    start = _rfind_newline(fd, end) + 1
    return os.pread(fd, end - start, start), end + 1


class AuditLog:
    """One service's audit log at ``path`` (see the module docstring).

    Args:
        path: the file being written (rotated files sit next to it).
        service: who writes (``{"role": ..., "name": ..., "modality": ...}``), in every entry.
        signer: the service's TLS key and certificate; ``None`` writes unsigned checkpoints.
        rotation: when to begin a new file (default: never).
        fsync: durability policy, ``"entry"`` (default) or ``"checkpoint"``.
        checkpoint_every: entries between checkpoints.
        checkpoint_interval: seconds after which waiting entries get a checkpoint (with
            :meth:`start`).
        reserve_bytes: :meth:`check_writable` refuses below this much free space.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        service: Mapping[str, Any],
        signer: Signer | None = None,
        rotation: Rotation | None = None,
        fsync: FsyncPolicy = "entry",
        checkpoint_every: int = 100,
        checkpoint_interval: float = 60.0,
        reserve_bytes: int = 1 << 20,
    ) -> None:
        if fsync not in ("entry", "checkpoint"):
            raise ValueError(f"fsync policy must be 'entry' or 'checkpoint', got {fsync!r}")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        self.path = Path(path).absolute()
        self.service = dict(service)
        self.signer = signer
        self.rotation = rotation or Rotation()
        self.fsync = fsync
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.reserve_bytes = reserve_bytes
        self.failure: str | None = None
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None  # (inode, size) of the file as we left it
        self._regular = True
        self._seq = 0  # the next entry's seq
        self._head = GENESIS
        self._started = time.time()  # first entry of the current file (age rotation)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._repaired = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT, 0o600)

    def _lock_path(self) -> Path:
        if self.path.parent == Path("/dev"):  # a device (tests: /dev/full): lock elsewhere
            return Path(os.environ.get("TMPDIR", "/tmp")) / f"jacfusion-audit-{self.path.name}.lock"
        return self.path.with_name(self.path.name + ".lock")

    # --- public API ------------------------------------------------------------------------

    @property
    def head(self) -> tuple[int, str]:
        """``(seq of the last entry, its hash)``; ``(-1, GENESIS)`` for an empty log."""
        with self._lock:
            return self._seq - 1, self._head

    def check_writable(self) -> None:
        """Raise :class:`AuditUnavailable` when the log's file system is (nearly) full."""
        if not self.reserve_bytes:
            return
        try:
            st = os.statvfs(self.path.parent)
        except OSError as exc:
            raise AuditUnavailable(f"cannot reach the audit log {self.path}: {exc}") from exc
        free = st.f_bavail * st.f_frsize
        if free < self.reserve_bytes:
            raise AuditUnavailable(
                f"the audit log's file system has {free} bytes free (< {self.reserve_bytes})"
            )

    def append(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one entry (``kind`` and ``fields``); returns it with ``seq``/``prev``/``hash``.

        Raises:
            AuditUnavailable: the entry could not be written (nothing of it is left).
        """
        with self._locked():
            entry = self._append_locked(kind, fields)
            if self._since_checkpoint >= self.checkpoint_every:
                self._checkpoint_locked()
            return entry

    def access(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """An ``access`` entry (see :func:`jacfusion_fed.audit.events.access_fields`)."""
        return self.append("access", fields)

    def event(self, event: str, **detail: Any) -> dict[str, Any]:
        """A ``service`` entry: ``event`` (``start``, ``stop``, ...) and its details."""
        return self.append("service", {"event": event, "detail": detail})

    def checkpoint(self) -> dict[str, Any]:
        """Write a (signed) checkpoint of the current head now."""
        with self._locked():
            return self._checkpoint_locked()

    def start(self) -> AuditLog:
        """Log ``start`` with a checkpoint (so everything before it is covered) and begin the
        timer that checkpoints waiting entries every ``checkpoint_interval`` seconds."""
        self.event("start", pid=os.getpid())
        self.checkpoint()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._timer, name="jacfusion-audit-checkpoint", daemon=True
            )
            self._thread.start()
        return self

    def close(self, *, stop_event: bool = True) -> None:
        """Log ``stop`` and a final checkpoint (best effort), then release the files."""
        self._stop.set()
        with self._lock:
            if self._lock_fd < 0:
                return
            if stop_event:
                try:
                    self.event("stop", pid=os.getpid())
                    self.checkpoint()
                except (AuditUnavailable, OSError) as exc:
                    log.error("audit log %s: cannot record the stop: %s", self.path, exc)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._lock_fd < 0:
                raise AuditUnavailable(f"the audit log {self.path} is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._sync_state()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            self._fd = None
            raise AuditUnavailable(f"cannot open the audit log {self.path}: {exc}") from exc
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._key = None

    def _sync_state(self) -> None:
        """Re-read the head when the file is not as this object left it (another writer)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        if self._fd is None or on_disk is None or on_disk.st_ino != os.fstat(self._fd).st_ino:
            self._open()
        assert self._fd is not None
        st = os.fstat(self._fd)
        if (st.st_ino, st.st_size) == self._key:
            return
        if not self._regular:  # a device: no chain to resume
            self._key = (st.st_ino, st.st_size)
            return
        line, end = _last_line(self._fd, st.st_size)
        if end < st.st_size:  # a partial line: its call was never answered; cut and log it
            os.ftruncate(self._fd, end)
            self._repaired = st.st_size - end
            log.warning(
                "audit log %s: cut a partial last line of %d bytes", self.path, self._repaired
            )
        if line:
            self._resume(line)
            self._started = self._first_time()
        else:
            self._started = time.time()
            older = segments(self.path)[:-1]  # the file itself is last
            if older:
                with open(older[-1], "rb") as fh:
                    tail, _ = _last_line(fh.fileno(), os.fstat(fh.fileno()).st_size)
                if tail:
                    self._resume(tail)
        self._key = (st.st_ino, end)
        if self._repaired:
            repaired, self._repaired = self._repaired, 0
            self._append_locked("service", {"event": "repair", "detail": {"cut": repaired}})

    def _resume(self, line: bytes) -> None:
        try:
            last = json.loads(line)
            self._seq, self._head = int(last["seq"]) + 1, str(last["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditUnavailable(
                f"the audit log {self.path} ends in a damaged line ({exc}); run "
                f"`jacfusion-fed audit verify {self.path}` and move the file away"
            ) from exc

    def _first_time(self) -> float:
        try:
            with open(self.path, "rb") as fh:
                first = json.loads(fh.readline())
            from datetime import datetime

            return datetime.strptime(first["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return time.time()

    def _due(self) -> bool:
        if not self._regular or self._key is None or self._key[1] == 0:
            return False
        rot = self.rotation
        if rot.max_bytes is not None and self._key[1] >= rot.max_bytes:
            return True
        return rot.max_seconds is not None and time.time() - self._started >= rot.max_seconds

    def _rotate_locked(self) -> None:
        self._checkpoint_locked()  # the closed file ends signed
        numbers = [int(p.name.rsplit(".", 1)[1]) for p in segments(self.path)[:-1]]
        target = segment_path(self.path, max(numbers, default=0) + 1)
        os.rename(self.path, target)
        fsync_dir(self.path.parent)
        self._open()
        self._key = (os.fstat(self._fd).st_ino, 0)  # type: ignore[arg-type]
        self._started = time.time()
        log.info("audit log rotated: %s", target)

    def _append_locked(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        if kind != "checkpoint" and self._due():
            try:
                self._rotate_locked()
            except OSError as exc:
                raise self._failed(exc, "rotate") from exc
        entry: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "seq": self._seq,
            "time": utc_now(),
            "kind": kind,
            "service": self.service,
            **fields,
            "prev": self._head,
        }
        if kind == "checkpoint" and self.signer is not None:
            entry["signer"] = self.signer.describe()
            entry["alg"] = self.signer.algorithm
            entry["sig"] = self.signer.sign(signed_bytes(entry))
        line = seal(entry)
        self._write(line, sync=self.fsync == "entry" or kind == "checkpoint")
        self._seq += 1
        self._head = entry["hash"]
        self._since_checkpoint = 0 if kind == "checkpoint" else self._since_checkpoint + 1
        return entry

    def _write(self, line: bytes, *, sync: bool) -> None:
        assert self._fd is not None and self._key is not None
        before = self._key[1]
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[written:]
            if sync and self._regular:
                os.fdatasync(self._fd)
        except OSError as exc:
            if self._regular:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, before)
            raise self._failed(exc, "write") from exc
        self.failure = None
        self._key = (self._key[0], before + len(line))

    def _failed(self, exc: OSError, what: str) -> AuditUnavailable:
        self.failure = f"cannot {what} the audit log {self.path}: {exc.strerror or exc}"
        log.error("%s", self.failure)
        return AuditUnavailable(self.failure)

    def _checkpoint_locked(self) -> dict[str, Any]:
        entry = self._append_locked("checkpoint", {"entries": self._seq})
        self._last_checkpoint = time.monotonic()
        return entry

    def _timer(self) -> None:
        while not self._stop.wait(min(1.0, self.checkpoint_interval)):
            if self._since_checkpoint == 0:
                continue
            if time.monotonic() - self._last_checkpoint < self.checkpoint_interval:
                continue
            try:
                self.checkpoint()
            except (AuditUnavailable, OSError) as exc:
                log.error("audit log %s: periodic checkpoint failed: %s", self.path, exc)
