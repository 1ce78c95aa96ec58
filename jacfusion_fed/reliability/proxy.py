"""A fault-injecting TCP proxy on loopback, to simulate a bad network between two processes.

:class:`FaultProxy` listens on ``127.0.0.1`` (only) and forwards every connection to an
upstream ``host:port``. TLS passes through untouched (the proxy never sees plaintext; gRPC's
``ssl_target_name_override`` keeps the server-name check working through it). Faults can be
switched at any time, from any thread:

``delay_s``
    every chunk is delivered ``delay_s`` seconds after it arrived (added latency, order and
    throughput kept; the coordinator sees a slow owner).
``stalled``
    the proxy stops reading in both directions: bytes pile up in the kernel buffers and TCP
    flow control stalls the sender, which is what a peer sees when packets are silently
    dropped (a blackhole). Clearing it delivers everything held, like a healed link.
``drop_rate``
    each chunk is discarded with this probability: a byte stream with holes, which breaks
    the TLS record layer (the connection dies and gRPC reconnects).
``refuse``
    new connections are reset at once (the peer is unreachable).
:meth:`cut`
    resets every open connection now (TCP RST; a network cut or a crashed middlebox).

Runs its own asyncio loop on a daemon thread; :meth:`stop` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["FaultProxy", "ProxyStats"]

_CHUNK = 65_536


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0
    cut: int = 0
    chunks: int = 0
    dropped_chunks: int = 0
    bytes: int = 0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy from ``host:port`` to ``upstream`` with switchable faults.

    Args:
        upstream: ``host:port`` to forward to.
        host: address to listen on (checked by :func:`jacfusion_fed.rpc.bind.check_bind_host`).
        port: local port (0 picks a free one; see :attr:`port` / :attr:`target`).
        seed: seed of the chunk-dropping draws.
    """

    def __init__(
        self, upstream: str, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0
    ) -> None:
        from jacfusion_fed.rpc.bind import check_bind_host, connect_host

        self.host = check_bind_host(host, what="fault proxy")
        self._dial_host = connect_host(self.host)
        host, sep, up_port = upstream.rpartition(":")
        if not sep or not up_port.isdigit():
            raise ValueError(f"upstream {upstream!r} must be host:port")
        self.upstream = (host.strip("[]"), int(up_port))
        self._want_port = port
        self.port = 0
        self.delay_s = 0.0
        self.drop_rate = 0.0
        self.refuse = False
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"{self._dial_host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the proxy did not start")
        if self._error is not None:
            raise OSError(f"proxy could not listen: {self._error}") from self._error
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self._want_port)
            )
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for writer in list(self._writers):
                _rst(writer)
            self._server.close()
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._server.wait_closed())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def stop(self) -> None:
        """Close the listener and every connection; returns when the loop has ended."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    # --- faults ---------------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running")
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait(10)

    def set(
        self,
        *,
        delay_s: float | None = None,
        drop_rate: float | None = None,
        stalled: bool | None = None,
        refuse: bool | None = None,
    ) -> None:
        """Change faults (unnamed ones stay as they are)."""
        if delay_s is not None:
            if delay_s < 0:
                raise ValueError("delay_s must be >= 0")
            self.delay_s = float(delay_s)
        if drop_rate is not None:
            if not 0.0 <= drop_rate <= 1.0:
                raise ValueError("drop_rate must be in [0, 1]")
            self.drop_rate = float(drop_rate)
        if refuse is not None:
            self.refuse = bool(refuse)
        if stalled is not None:
            flowing = self._flowing
            assert flowing is not None
            self._call(flowing.clear if stalled else flowing.set)

    def heal(self) -> None:
        """No faults any more (open connections stay open)."""
        self.set(delay_s=0.0, drop_rate=0.0, stalled=False, refuse=False)

    @property
    def stalled(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def cut(self) -> int:
        """Reset every open connection now; returns how many were reset."""
        count = [0]

        def reset_all() -> None:
            for writer in list(self._writers):
                _rst(writer)
                count[0] += 1
            self._writers.clear()

        self._call(reset_all)
        self.stats.cut += count[0] // 2
        return count[0] // 2

    # --- forwarding -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.stats.refused += 1
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats.refused += 1
            _rst(writer)
            return
        self.stats.connections += 1
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        try:
            # gRPC connections are done when either side is: close both then.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.close()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy ``src`` to ``dst`` through the faults; a delivery task keeps the latency
        without limiting throughput."""
        assert self._flowing is not None
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(queue, dst))
        eof = False
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # stalled meanwhile: hold what was read
                self.stats.chunks += 1
                if self.drop_rate and self._rng.random() < self.drop_rate:
                    self.stats.dropped_chunks += 1
                    continue
                self.stats.bytes += len(data)
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait((time.monotonic() + self.delay_s, None))  # EOF after the data
            eof = True
        except (ConnectionError, OSError):
            pass
        finally:
            if not eof:
                deliver.cancel()  # reset or cancelled: nothing more to deliver
            with contextlib.suppress(BaseException):
                await deliver

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes | None]], dst: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                due, data = await queue.get()
                if data is None:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, RuntimeError):
            return
