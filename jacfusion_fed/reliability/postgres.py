"""A throwaway PostgreSQL cluster for tests and durability runs, stopped by its PID.

``initdb`` into a fresh folder, then the ``postgres`` server on ``host`` (loopback by default)
and a free port, with trust authentication for the addresses it was told to admit. PostgreSQL
refuses to run as root, so as root the server runs as an unprivileged user (``postgres``, the
Debian package's, or ``pgtest``, created if neither exists) through ``runuser``. The folder is
removed by :meth:`PostgresCluster.stop`.

    with PostgresCluster() as pg:
        HeadRegistry(pg.uri).register(...)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresCluster", "postgres_binaries", "postgres_missing"]


def postgres_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (PATH, then Debian's layout), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(candidate).parent
    return None


def postgres_missing() -> str | None:
    """Why no cluster can be started here (for ``pytest.skip``), or None."""
    if postgres_binaries() is None:
        return "PostgreSQL server binaries (initdb, postgres) not found"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser"
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _service_user() -> str:
    for name in ("postgres", "pgtest"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", "pgtest"],
        check=True,
        capture_output=True,
    )
    return "pgtest"


class PostgresCluster:
    """One PostgreSQL server (see the module docstring).

    Args:
        host: the address it listens on.
        port: its port (default: a free one).
        admit: a CIDR range admitted without a password besides ``host`` (e.g. a test subnet).
        wrap: argv prefix for the server (e.g. ``["ip", "netns", "exec", NS]``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        admit: str | None = None,
        wrap: list[str] | None = None,
    ) -> None:
        bindir = postgres_binaries()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, postgres) not found")
        self.bindir, self.host = bindir, host
        self.port = port or _free_port(host if not wrap else "127.0.0.1")
        self.admit, self.wrap = admit, list(wrap or [])
        self.root = Path(tempfile.mkdtemp(prefix="jacfusion-pg-"))
        self.data = self.root / "data"
        self.user = _service_user() if os.geteuid() == 0 else None
        self.proc: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._as_user(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
        )
        hba = f"host all all {host}/32 trust\n" + (f"host all all {admit} trust\n" if admit else "")
        with open(self.data / "pg_hba.conf", "a", encoding="utf-8") as fh:
            fh.write(hba)

    def _argv(self, argv: list[str]) -> list[str]:
        return argv if self.user is None else ["runuser", "-u", self.user, "--", *argv]

    def _as_user(self, argv: list[str], *, check: bool) -> None:
        proc = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> str:
        """Start the server and wait until it accepts connections; returns :attr:`uri`."""
        argv = self.wrap + self._argv(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                "fsync=on",
            ]
        )
        old = self.pid()  # a crash leaves its postmaster.pid: wait for the new server's
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - kept for the process
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            if (self.data / "postmaster.pid").exists() and self.pid() != old and self._ready():
                return self.uri
            time.sleep(0.1)
        raise TimeoutError(f"postgres did not accept connections in {timeout} s")

    def _ready(self) -> bool:
        lines = (self.data / "postmaster.pid").read_text().splitlines()
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def pid(self) -> int | None:
        """The postmaster's PID (from ``postmaster.pid``), while it runs."""
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def _signal(self, sig: int, timeout: float) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster): no checkpoint, recovery on restart,
        as after a power cut of the server."""
        self._signal(signal.SIGQUIT, 30.0)

    def stop(self, *, remove: bool = True) -> None:
        """Fast shutdown (SIGINT to the postmaster, by PID); the folder removed with ``remove``."""
        self._signal(signal.SIGINT, 30.0)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
