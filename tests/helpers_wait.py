"""Waiting in tests: on a condition, never for a fixed time.

A test waits for the thing it needs (a port that accepts, a file that appears, a health check
that passes, a count that is reached), checked at a short interval and bounded by a deadline;
on timeout it fails naming what it waited for. A fixed ``time.sleep`` is kept only where the
delay itself is under test, and says so where it stands.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["port_accepts", "port_is_free", "wait_for_file", "wait_until"]

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    what: str | Callable[[], str],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    stop: threading.Event | None = None,
) -> T:
    """Call ``condition`` until it returns something truthy; return that value.

    Args:
        condition: checked at once, then every ``interval`` seconds.
        what: what is awaited, for the error message (``"the owner to restart"``); a
            callable is asked only on timeout (to say what was seen last).
        timeout: seconds until :class:`TimeoutError`.
        interval: seconds between checks (an event wait, woken early by ``stop``).
        stop: optional; when set, stop waiting at once with :class:`TimeoutError`.
    """
    deadline = time.monotonic() + timeout
    pause = stop or threading.Event()
    while True:
        value = condition()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0 or pause.is_set():
            said = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {said}")
        pause.wait(min(interval, left))


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to ``host:port`` is accepted now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``host:port`` now (as gRPC does, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_file(path: Path, what: str, *, timeout: float = 30.0) -> str:
    """Wait until ``path`` exists with non-blank content; return the content, stripped."""

    def content() -> str:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            return ""

    return wait_until(content, what, timeout=timeout)
