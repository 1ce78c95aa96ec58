"""The fault proxy's cut() also resets a connection that was still opening upstream when the
cut ran (the race behind a CI failure of test_requester_link_faults: a client reconnecting
during the cut kept a live link through the "refuse" phase)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

import pytest

from jacfusion_fed.reliability import proxy as proxy_mod
from jacfusion_fed.reliability.proxy import FaultProxy


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # a reset link is what one case tests
        conn.sendall(conn.recv(64))


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _talk(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"ping")
        try:
            return c.recv(64)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize("cut_while_opening", [False, True])
def test_cut_resets_a_connection_that_was_opening(
    monkeypatch: pytest.MonkeyPatch, cut_while_opening: bool
) -> None:
    srv, port = _echo_server()
    opening, release = threading.Event(), threading.Event()
    real_open = asyncio.open_connection

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        opening.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(proxy_mod.asyncio, "open_connection", slow_open)
    proxy = FaultProxy(f"127.0.0.1:{port}").start()
    try:
        got: list[bytes] = []
        client = threading.Thread(target=lambda: got.append(_talk(proxy.port)))
        client.start()
        assert opening.wait(5)  # the proxy is connecting upstream
        if cut_while_opening:
            proxy.cut()
        release.set()
        client.join(10)
        # without a cut the link works; a cut during the opening resets it
        assert got == ([b""] if cut_while_opening else [b"ping"])
        assert proxy.stats.refused == (1 if cut_while_opening else 0)
    finally:
        proxy.stop()
        srv.close()
