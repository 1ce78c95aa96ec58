"""Child processes that are always stopped: the one process manager of the project.

- :class:`ManagedProcess`: one child in its own session (process group id == pid), stdout
  and stderr appended to a log file; :meth:`~ManagedProcess.stop` signals the whole group
  (and descendants that left it, found through ``/proc``): SIGTERM, then SIGKILL.
- :func:`stop_all`: stop several at once (one shared grace period).
- :class:`ProcessSet`: named children of one owner (a deployment, a benchmark, a test module),
  each logging to ``<logdir>/<name>.log``; wait for a port file, stop or kill by name, a
  context manager that stops everything on exit.
- :func:`free_port`, :func:`port_open`, :func:`wait_for_port`: loopback ports.

Everything is done by PID, never by process name. The leader of a group is reaped only after
its group was signalled, so its id cannot be reused by another process in between.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "ManagedProcess",
    "ProcessSet",
    "free_port",
    "port_open",
    "stop_all",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (callers retry on the rare race)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


class ManagedProcess:
    """A child process in its own session, logging to a file (appended).

    Args:
        name: shown in errors and ``repr``.
        argv: the command line.
        env: its environment (default: ours, with ``PYTHONUNBUFFERED=1``).
        cwd: its working directory (created; default: ours).
        log_path: stdout and stderr go here (appended; folders created).
        log_command: write ``$ argv`` as the first line of the log.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path,
        log_command: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environ = dict(os.environ, PYTHONUNBUFFERED="1") if env is None else dict(env)
        with self.log_path.open("ab") as log_fh:
            if log_command:
                log_fh.write(f"$ {' '.join(self.argv)}\n".encode())
                log_fh.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=None if cwd is None else str(cwd),
                env=environ,
                start_new_session=True,
            )
        self.pid = self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (as :class:`subprocess.Popen`)."""
        return self._popen.returncode

    def exit_code(self) -> int | None:
        """The exit status if the process has exited, without reaping it."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._popen.poll()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return int(info.si_status)
        return -int(info.si_status)

    def poll(self) -> int | None:
        """Like :meth:`exit_code` (``Popen.poll``'s name)."""
        return self.exit_code()

    def is_running(self) -> bool:
        return self.exit_code() is None

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to exit; its exit status or None."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            code = self.exit_code()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(0.1, pause * 2)

    def log_text(self, max_chars: int | None = None) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return text if max_chars is None else text[-max_chars:]

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the whole group (no-op once the leader has been reaped)."""
        if self._popen.returncode is None:
            self._signal_group(signal.SIGTERM)

    def kill_and_reap(self) -> int | None:
        """SIGKILL to whatever is left of the group, then reap the leader.

        The unreaped leader keeps the group id reserved until here, so the signal reaches
        only our group.
        """
        if self._popen.returncode is not None:
            return self._popen.returncode
        self._signal_group(signal.SIGKILL)
        try:
            return self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd, cannot hang
            return None

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process group (SIGTERM, SIGKILL after ``grace`` s); the exit status."""
        return stop_all([self], grace)[0]

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, exit={self.exit_code()})"


# ------------------------------------------------------------------------ process trees
def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) from /proc; None if gone or not on Linux."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """Every live process below ``root``: pid -> (pgid, start time). Linux only."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[str, int, int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = st
                children.setdefault(st[1], []).append(int(entry.name))
    out: dict[int, tuple[int, int]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in out and stats[pid][0] != "Z":
            out[pid] = (stats[pid][2], stats[pid][3])
            todo.extend(children.get(pid, []))
    return out


def _outside(found: dict[int, tuple[int, int]], leaders: set[int]) -> dict[int, tuple[int, int]]:
    """The processes of ``found`` still alive (same start time) and outside our groups."""
    out = {}
    for pid, (pgid, started) in found.items():
        st = _proc_stat(pid)
        if st is not None and st[0] != "Z" and st[3] == started and pgid not in leaders:
            out[pid] = (pgid, started)
    return out


def _signal_descendants(found: dict[int, tuple[int, int]], leaders: set[int], sig: int) -> None:
    """Signal processes found below our leaders that left our process groups (Flower's
    SuperLink starts its SuperExec in a new session; ServerApps run in that one), by pid
    or, for a group leader, by its group; only if still the same process (start time)."""
    for pid, (pgid, _started) in _outside(found, leaders).items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)


def stop_all(procs: Sequence[ManagedProcess], grace: float = 10.0) -> list[int | None]:
    """Stop several processes at once, with everything they spawned: SIGTERM to their
    groups (and to descendants in other groups), wait up to ``grace`` s for the leaders,
    up to 0.5 s more for descendants outside their groups, then SIGKILL the same set and
    reap the leaders."""
    live = [p for p in procs if p.returncode is None]
    leaders = {p.pid for p in live}
    found: dict[int, tuple[int, int]] = {}
    for proc in live:
        found.update(_descendants(proc.pid))
    for proc in live:
        proc.terminate()
    _signal_descendants(found, leaders, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        proc.wait(max(0.0, deadline - time.monotonic()))
    rest = time.monotonic() + 0.5
    while _outside(found, leaders) and time.monotonic() < rest:
        time.sleep(0.05)
    _signal_descendants(found, leaders, signal.SIGKILL)
    return [proc.kill_and_reap() for proc in procs]


def wait_for_port(
    proc: ManagedProcess, port: int, timeout: float, host: str = LOOPBACK
) -> int | None:
    """Wait until ``host:port`` accepts connections (returns None) or ``proc`` exits first
    (returns its exit status). Raises ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while time.monotonic() < deadline:
        code = proc.exit_code()
        if code is not None:
            return code
        if port_open(port, host):
            return None
        time.sleep(pause)
        pause = min(0.2, pause * 2)
    raise TimeoutError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f} s")


# ------------------------------------------------------------------------ named children
class ProcessSet:
    """Named child processes, each logging to ``<logdir>/<name>.log``; stopped by PID.

    Args:
        logdir: folder of the log files (created).
        prefix: put before every command line, e.g. ``(sys.executable,)`` or
            ``(sys.executable, "-c", "from jacfusion_fed.cli import main; main()")``.
        log_command: write ``$ argv`` as the first line of each log.

    The environment of a child is ours at :meth:`start` time (plus ``PYTHONUNBUFFERED=1``).
    """

    def __init__(
        self, logdir: Path, *, prefix: Sequence[str] = (), log_command: bool = False
    ) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.prefix = list(prefix)
        self.log_command = log_command
        self.procs: dict[str, ManagedProcess] = {}

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``prefix + args`` as ``name`` (a name still running is refused)."""
        old = self.procs.get(name)
        if old is not None and old.is_running():
            raise RuntimeError(f"a process named {name!r} is running (pid {old.pid})")
        proc = ManagedProcess(
            name,
            [*self.prefix, *args],
            env=env,
            cwd=cwd,
            log_path=self.log_path(name),
            log_command=self.log_command,
        )
        self.procs[name] = proc
        return proc

    def start_serving(self, name: str, args: Sequence[str], port_file: Path) -> ManagedProcess:
        """Start a server that writes its port to ``port_file`` (removed first)."""
        port_file.unlink(missing_ok=True)
        return self.start(name, args)

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def wait_port(self, name: str, port_file: Path, timeout: float = 180.0) -> int:
        """The port a server wrote to ``port_file`` once serving (written atomically).

        Raises:
            RuntimeError: the process exited first (with the tail of its log).
            TimeoutError: no port after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        pause = 0.01
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(port_file.read_text().strip())
            if proc.exit_code() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.exit_code()}:\n{self.log(name)[-3000:]}"
                )
            time.sleep(pause)
            pause = min(0.05, pause * 2)
        raise TimeoutError(f"{name} did not start within {timeout} s:\n{self.log(name)[-3000:]}")

    def kill(self, name: str) -> None:
        """SIGKILL, as in a crash (reaped; the name is forgotten)."""
        self.procs.pop(name).kill_and_reap()

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout`` s; the exit status (None: no such process)."""
        proc = self.procs.pop(name, None)
        return None if proc is None else proc.stop(timeout)

    def stop_all(self, timeout: float = 10.0) -> None:
        procs = list(self.procs.values())
        self.procs.clear()
        stop_all(procs, timeout)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs.values()}

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()  # whatever ended the block
