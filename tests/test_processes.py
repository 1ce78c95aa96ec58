"""The one process manager (jacfusion_fed.processes): start, wait for a port, stop by PID."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.processes import (
    ManagedProcess,
    ProcessSet,
    free_port,
    port_open,
    stop_all,
    wait_for_port,
)

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")

# A child that writes a port file, then ignores SIGTERM (only SIGKILL ends it).
STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write("4242\\n")
import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("ready", flush=True)
for _ in range(600):
    time.sleep(0.1)
"""
# A child that listens on a port and exits cleanly on SIGTERM.
LISTENER = """
import signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
signal.pause()
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_process_set_waits_for_the_port_file_and_kills_the_stubborn(tmp_path: Path) -> None:
    port_file = tmp_path / "child.port"
    with ProcessSet(tmp_path / "logs", prefix=(sys.executable, "-c", STUBBORN)) as procs:
        proc = procs.start_serving("child", [str(port_file)], port_file)
        assert procs.wait_port("child", port_file, timeout=60) == 4242
        assert procs.pids == {proc.pid}
        t0 = time.monotonic()
        code = procs.stop("child", timeout=0.5)  # SIGTERM ignored: SIGKILL after 0.5 s
        assert time.monotonic() - t0 < 5
        assert code == -9
        assert not _alive(proc.pid)
        assert "ready" in procs.log("child")
        assert procs.stop("child") is None  # forgotten once stopped


def test_wait_port_names_an_early_exit_with_its_log(tmp_path: Path) -> None:
    procs = ProcessSet(tmp_path, prefix=(sys.executable, "-c"))
    procs.start("bad", ["import sys; print('no such data'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"(?s)bad exited with 3.*no such data"):
        procs.wait_port("bad", tmp_path / "never.port", timeout=60)
    procs.stop_all()


def test_a_running_name_is_not_started_twice(tmp_path: Path) -> None:
    with ProcessSet(tmp_path, prefix=(sys.executable, "-c")) as procs:
        procs.start("x", ["import time; time.sleep(30)"])
        with pytest.raises(RuntimeError, match="'x' is running"):
            procs.start("x", ["pass"])
        pid = procs.procs["x"].pid
    assert not _alive(pid)  # the context manager stopped it


def test_managed_process_waits_for_a_tcp_port_and_stops_its_group(tmp_path: Path) -> None:
    port = free_port()
    proc = ManagedProcess(
        "listener", [sys.executable, "-c", LISTENER, str(port)], log_path=tmp_path / "l.log"
    )
    try:
        assert wait_for_port(proc, port, timeout=60) is None
        assert port_open(port)
        assert os.getpgid(proc.pid) == proc.pid  # its own session and group
        assert "$ " in proc.log_text()  # the command line heads the log
    finally:
        assert stop_all([proc], grace=10)[0] == 0  # exited on SIGTERM
    assert not port_open(port)


def test_port_file_written_atomically_is_read_whole(tmp_path: Path) -> None:
    port_file = tmp_path / "p.port"
    atomic_write_bytes(port_file, b"1234\n")
    procs = ProcessSet(tmp_path, prefix=(sys.executable, "-c"))
    procs.start("sleeper", ["import time; time.sleep(30)"])
    try:
        assert procs.wait_port("sleeper", port_file, timeout=10) == 1234
    finally:
        procs.kill("sleeper")
    assert "sleeper" not in procs.procs
