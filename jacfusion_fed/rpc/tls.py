"""Transport security for every gRPC server and channel of the project (one place).

* :class:`TlsFiles` names a CA certificate, a certificate and its key (the per-principal
  layout written by :func:`jacfusion_fed.privacy.certs.generate_deployment_certs`).
* :data:`INSECURE` is the only way to get plaintext; it must be passed explicitly, and an
  insecure server only binds to a loopback address.
* :func:`create_server` / :func:`create_channel` apply message-size limits, keepalive settings
  and ``SO_REUSEPORT=0`` (no other process can bind the same port), and bind only the
  address they are given (default ``127.0.0.1``; wildcard addresses need an explicit opt-in).

mTLS is the default: servers require and verify a client certificate issued by the
deployment CA; what a verified client may call is decided by :mod:`jacfusion_fed.rpc.auth`.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INSECURE",
    "Insecure",
    "PortInUseError",
    "Security",
    "TlsFiles",
    "TransportOptions",
    "channel_credentials",
    "channel_options",
    "check_port_free",
    "create_channel",
    "create_server",
    "is_loopback",
    "is_wildcard",
    "server_credentials",
    "server_options",
]

DEFAULT_HOST: Final = "127.0.0.1"
#: 64 MiB: 100k 64-character sample ids (~7 MB) or 100k x 10 float64 logits (8 MB) fit easily.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one principal: the CA certificate, its own certificate and private key.

    The one TLS-files type of the project: gRPC servers and channels, and the Flower
    SuperLink of :class:`jacfusion_fed.federation.LocalDeployment` (where ``cert`` must carry
    the SANs 127.0.0.1 / localhost and ``key`` is unencrypted). Paths are made absolute and
    must name existing files (``FileNotFoundError`` naming the missing one otherwise).
    """

    ca_cert: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for name in ("ca_cert", "cert", "key"):
            path = Path(getattr(self, name)).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"TLS file not found: {path} ({name})")
            object.__setattr__(self, name, path)

    @classmethod
    def from_dir(cls, directory: str | Path) -> TlsFiles:
        """``<directory>/ca.pem``, ``cert.pem``, ``key.pem`` (layout of ``write_credentials``)."""
        d = Path(directory)
        return cls(d / "ca.pem", d / "cert.pem", d / "key.pem")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(ca_pem, cert_pem, key_pem)``; raises ``FileNotFoundError`` naming a missing file."""
        out = []
        for path in (self.ca_cert, self.cert, self.key):
            if not Path(path).is_file():
                raise FileNotFoundError(f"TLS file not found: {path}")
            out.append(Path(path).read_bytes())
        return out[0], out[1], out[2]


class Insecure:
    """Marker for plaintext transport; use the :data:`INSECURE` singleton, explicitly."""

    _instance: Insecure | None = None

    def __new__(cls) -> Insecure:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INSECURE"


INSECURE: Final = Insecure()
Security = TlsFiles | Insecure


def _as_tls(security: TlsFiles | str | Path) -> TlsFiles:
    if isinstance(security, TlsFiles):
        return security
    if isinstance(security, (str, Path)):
        return TlsFiles.from_dir(security)
    raise TypeError(f"expected TlsFiles or a certificate directory, got {security!r}")


def server_credentials(
    tls: TlsFiles | str | Path, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server TLS credentials; by default clients must present a certificate from the CA."""
    ca, cert, key = _as_tls(tls).read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_auth
    )


def channel_credentials(
    tls: TlsFiles | str | Path, *, client_certificate: bool = True
) -> grpc.ChannelCredentials:
    """Channel TLS credentials trusting only the deployment CA, presenting our certificate."""
    ca, cert, key = _as_tls(tls).read()
    if not client_certificate:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


@dataclass(frozen=True)
class TransportOptions:
    """Message-size and keepalive settings shared by servers and channels.

    The client pings every ``keepalive_time_ms`` (also while idle, to notice dead owners
    early) and the server accepts pings that often; ``keepalive_timeout_ms`` is how long a
    ping may stay unanswered before the connection is closed.
    """

    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    keepalive_permit_without_calls: bool = True
    server_min_ping_interval_ms: int = 30_000
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            value = getattr(self, name)
            if not 0 < value <= 2**31 - 1:
                raise ValueError(f"{name} must be in 1..2**31-1, got {value}")
        if self.server_min_ping_interval_ms > self.keepalive_time_ms:
            raise ValueError(
                "server_min_ping_interval_ms must not exceed keepalive_time_ms, or the server "
                "closes connections with GOAWAY too_many_pings"
            )


def _common_options(opts: TransportOptions) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", opts.max_receive_message_bytes),
        ("grpc.max_send_message_length", opts.max_send_message_bytes),
        ("grpc.keepalive_time_ms", opts.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", opts.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(opts.keepalive_permit_without_calls)),
    ]


def server_options(opts: TransportOptions | None = None) -> list[tuple[str, Any]]:
    """gRPC server channel arguments for ``opts``."""
    opts = opts or TransportOptions()
    return [
        *_common_options(opts),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", opts.server_min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
        *opts.extra,
    ]


def channel_options(
    opts: TransportOptions | None = None, *, server_name: str | None = None
) -> list[tuple[str, Any]]:
    """gRPC channel arguments; ``server_name`` is the name the server certificate must carry."""
    opts = opts or TransportOptions()
    out = [*_common_options(opts), ("grpc.http2.max_pings_without_data", 0)]
    if server_name is not None:
        out.append(("grpc.ssl_target_name_override", server_name))
    return [*out, *opts.extra]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface (``""``, ``*``, ``0.0.0.0``, ``::``)."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _address(host: str, port: int) -> str:
    h = host.strip("[]")
    try:
        if ipaddress.ip_address(h).version == 6:
            return f"[{h}]:{port}"
    except ValueError:
        pass
    return f"{h}:{port}"


class PortInUseError(OSError):
    """The port is taken by another socket that listens there."""


def _port_taken(host: str, port: int) -> bool:
    """Whether a listening socket holds ``host:port`` (a lingering TIME_WAIT does not count:
    the probe sets ``SO_REUSEADDR`` as gRPC does)."""
    h = host.strip("[]")
    h = "0.0.0.0" if h in ("", "*") else h
    try:
        infos = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
            return False
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` when a listening socket holds ``host:port`` (port 0:
    nothing to check). Lets a command refuse at once, before slow work such as training."""
    if port and _port_taken(host, port):
        raise _in_use(_address(host, port), port)


def _in_use(address: str, port: int) -> PortInUseError:
    return PortInUseError(
        errno.EADDRINUSE,
        f"could not bind {address}: port {port} is already in use by another process "
        "(choose another port, or 0 for a free one)",
    )


def create_server(
    security: Security | str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    max_workers: int = 8,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: TransportOptions | None = None,
    require_client_auth: bool = True,
    allow_all_interfaces: bool = False,
    maximum_concurrent_rpcs: int | None = None,
) -> tuple[grpc.Server, int]:
    """Create a (not yet started) gRPC server bound to ``host:port``; returns it and the port.

    Args:
        security: :class:`TlsFiles`, a certificate directory, or :data:`INSECURE`.
        host: address to bind (default 127.0.0.1). Wildcards (``0.0.0.0``, ``::``) need
            ``allow_all_interfaces=True``; an insecure server binds only to loopback.
        port: port to bind; 0 picks a free one (returned).
        max_workers: handler threads.
        interceptors: e.g. :class:`jacfusion_fed.rpc.auth.AuthInterceptor`.
        options: message-size and keepalive settings.
        require_client_auth: mTLS (default); ``False`` accepts clients without certificates
            (then every authorisation check answers UNAUTHENTICATED).
        allow_all_interfaces: permit binding a wildcard address.
        maximum_concurrent_rpcs: reject further RPCs with RESOURCE_EXHAUSTED beyond this.

    Raises:
        ValueError: on a refused address / security combination.
        PortInUseError: ``port`` is taken by a listening socket (an ``OSError``).
        OSError: when the address cannot be bound otherwise.
    """
    if is_wildcard(host) and not allow_all_interfaces:
        raise ValueError(
            f"refusing to bind wildcard address {host!r}: pass allow_all_interfaces=True "
            "or bind a specific address (default 127.0.0.1)"
        )
    if isinstance(security, Insecure) and not is_loopback(host):
        raise ValueError(f"an insecure server may only bind a loopback address, not {host!r}")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jacfusion-rpc"),
        interceptors=list(interceptors),
        options=server_options(options),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    address = _address(host, port)
    if port and _port_taken(host, port):  # before gRPC, which would log a C-core error line
        raise _in_use(address, port)
    try:
        if isinstance(security, Insecure):
            bound = server.add_insecure_port(address)
        else:
            creds = server_credentials(_as_tls(security), require_client_auth=require_client_auth)
            bound = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        if port and _port_taken(host, port):
            raise _in_use(address, port) from exc
        raise OSError(f"could not bind {address}: {exc}") from exc
    if not bound:
        if port and _port_taken(host, port):
            raise _in_use(address, port)
        raise OSError(f"could not bind {address}")
    return server, bound


def create_channel(
    target: str,
    security: Security | str | Path,
    *,
    server_name: str | None = None,
    options: TransportOptions | None = None,
    client_certificate: bool = True,
) -> grpc.Channel:
    """Create a channel to ``target`` (``host:port``).

    Args:
        target: server address.
        security: :class:`TlsFiles`, a certificate directory, or :data:`INSECURE`.
        server_name: DNS name the server's certificate must carry (e.g.
            :func:`jacfusion_fed.privacy.certs.owner_server_name`); default: the target host.
        options: message-size and keepalive settings.
        client_certificate: present our certificate (mTLS; default).
    """
    if isinstance(security, Insecure):
        if server_name is not None:
            raise ValueError("server_name requires TLS; it cannot be checked on INSECURE")
        return grpc.insecure_channel(target, options=channel_options(options))
    creds = channel_credentials(_as_tls(security), client_certificate=client_certificate)
    return grpc.secure_channel(
        target, creds, options=channel_options(options, server_name=server_name)
    )
