"""A deliberately abusive gRPC client: it opens streams and never reads (for abuse tests).

gRPC's own clients keep reading their socket whatever the application does, so they cannot
stall a server. :class:`StallingClient` speaks just enough HTTP/2 over mTLS to start calls
and then stops reading at the TCP level. It never sends a WINDOW_UPDATE, so the server can
write at most the HTTP/2 flow-control window (``window``, 64 KiB by default, per stream and per
connection) before its writes block; with a large ``window`` the server writes on until the
kernel's socket buffers are full (a few MB on loopback). This is what a crashed-but-connected
client, a frozen process, or an attacker looks like.

Only what the tests need is implemented: the client preface, SETTINGS, WINDOW_UPDATE, and per
call one HEADERS frame (HPACK literals without Huffman coding) plus one DATA frame carrying the
length-prefixed gRPC message.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from typing import Final

from jacfusion_fed.rpc.tls import TlsFiles

__all__ = ["StallingClient", "grpc_frame", "hpack_literal"]

_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _SETTINGS, _WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
_MAX_WINDOW: Final = 2**31 - 1


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream & 0x7FFFFFFF)
        + payload
    )


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(headers: Iterable[tuple[str, str]]) -> bytes:
    """HPACK block of literal header fields without indexing, new names, no Huffman."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _hpack_int(len(name), 7) + name.encode()
        out += _hpack_int(len(value), 7) + value.encode()
    return bytes(out)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class StallingClient:
    """One mTLS HTTP/2 connection that starts calls and never reads a byte of the replies.

    Args:
        target: ``host:port`` of the server.
        tls: the client's certificate files (a requester's, to get past authorisation).
        server_name: the TLS name to check in the server certificate.
        recv_buffer: ``SO_RCVBUF`` of the socket; small, so the stall starts early.
        window: the flow-control window announced for each stream and for the connection.
    """

    def __init__(
        self,
        target: str,
        tls: TlsFiles,
        server_name: str,
        *,
        recv_buffer: int = 4096,
        window: int = 65_535,
    ) -> None:
        if not 0 <= window <= _MAX_WINDOW:
            raise ValueError(f"window must be in 0..{_MAX_WINDOW}, got {window}")
        host, _, port = target.rpartition(":")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(tls.ca_cert))
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
        ctx.set_alpn_protocols(["h2"])
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        raw.settimeout(10.0)
        raw.connect((host, int(port)))
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.authority = server_name
        self._next_stream = 1
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, window)
        grow = (
            _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65_535))
            if window > 65_535
            else b""
        )
        self.sock.sendall(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + grow
            # Acknowledge the server's SETTINGS without reading them (it sends them first).
            + _frame(_SETTINGS, _ACK, 0, b"")
        )

    def start(self, method: str, message: bytes, *, count: int = 1) -> list[int]:
        """Start ``count`` calls of ``method`` (``/pkg.Service/Method``); returns stream ids."""
        ids = []
        out = bytearray()
        for _ in range(count):
            stream = self._next_stream
            self._next_stream += 2
            block = hpack_literal(
                [
                    (":method", "POST"),
                    (":scheme", "https"),
                    (":path", method),
                    (":authority", self.authority),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ]
            )
            out += _frame(_HEADERS, _END_HEADERS, stream, block)
            out += _frame(_DATA, _END_STREAM, stream, grpc_frame(message))
            ids.append(stream)
        self.sock.sendall(bytes(out))
        return ids

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def stall(
    target: str,
    tls: TlsFiles,
    server_name: str,
    method: str,
    message: bytes,
    streams: int,
    *,
    connections: int = 1,
) -> Sequence[StallingClient]:
    """``streams`` stalled calls spread over ``connections`` connections."""
    clients = [StallingClient(target, tls, server_name) for _ in range(connections)]
    for i, client in enumerate(clients):
        share = streams // connections + (1 if i < streams % connections else 0)
        if share:
            client.start(method, message, count=share)
    return clients
