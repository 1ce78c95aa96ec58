"""How the coordinator reaches one owner: a ``ModalityService`` stub and the owner's TLS
identity, behind one small seam (:data:`ConnectOwner`) that tests and the fuzz harness replace.

The default, :func:`grpc_connector`, opens an mTLS channel whose every handshake pins the
owner's modality (:func:`jacfusion_fed.rpc.auth.connect_owner`); without TLS a plain channel.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from jacfusion_fed.rpc.auth import connect_owner, fetch_server_principal
from jacfusion_fed.rpc.identity import AuthError
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2_grpc
from jacfusion_fed.rpc.tls import Insecure, Security, TlsFiles, TransportOptions, create_channel

from .predict_types import OwnerEndpoint

__all__ = ["ConnectOwner", "OwnerChannel", "OwnerFailure", "grpc_connector", "rpc_failure"]


class OwnerFailure(Exception):
    """One owner's call failed; ``code`` is the gRPC status it counts as."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def text(self) -> str:
        return f"{self.code.name}: {self.message}"


def rpc_failure(modality: str, target: str, exc: grpc.RpcError) -> OwnerFailure:
    """An owner's :class:`grpc.RpcError` as an :class:`OwnerFailure` naming the owner."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return OwnerFailure(code, f"owner of {modality!r} at {target}: {details}")


def _no_identity(_timeout: float) -> str | None:
    return None


def _nothing() -> None:
    return None


@dataclass
class OwnerChannel:
    """A connection to one owner.

    Attributes:
        stub: anything with ``GetInfo``, ``GetHead`` and ``GetLogits(request, timeout=)``
            (a ``ModalityServiceStub``, or a fake in tests).
        identity: ``identity(timeout) -> owner name`` from its certificate after checking
            that it owns the configured modality (``None`` without TLS); raises
            :class:`OwnerFailure`.
        close: closes the connection.
    """

    stub: Any
    identity: Callable[[float], str | None] = field(default=_no_identity)
    close: Callable[[], None] = field(default=_nothing)


#: ``connect(endpoint) -> OwnerChannel``: the coordinator's one injection point towards owners.
ConnectOwner = Callable[[OwnerEndpoint], OwnerChannel]


def _identity(endpoint: OwnerEndpoint, security: TlsFiles, timeout: float) -> str:
    modality, target = endpoint.modality, endpoint.target
    try:
        principal = fetch_server_principal(target, security, timeout=timeout)
    except AuthError as exc:
        raise OwnerFailure(exc.code, f"owner of {modality!r} at {target}: {exc}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise OwnerFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"owner of {modality!r} at {target}: TLS handshake failed: {exc}",
        ) from exc
    if principal.role != "owner" or principal.modality != modality:
        raise OwnerFailure(
            grpc.StatusCode.PERMISSION_DENIED,
            f"server at {target} is {principal.describe()}, expected the owner of "
            f"modality {modality!r}",
        )
    return principal.name


def grpc_connector(security: Security, transport: TransportOptions) -> ConnectOwner:
    """The real connector: a gRPC channel per owner (mTLS pinned to its modality)."""

    def connect(endpoint: OwnerEndpoint) -> OwnerChannel:
        target = endpoint.target
        if isinstance(security, Insecure):
            channel = create_channel(target, security, options=transport)
        else:
            # No handshake now (the owner may be down); every later handshake pins the
            # owner's modality through its certificate's DNS name.
            channel = connect_owner(
                target, security, endpoint.modality, options=transport, verify_now=False
            )
        identity: Callable[[float], str | None] = _no_identity
        if isinstance(security, TlsFiles):
            tls = security

            def identity(timeout: float) -> str | None:
                return _identity(endpoint, tls, timeout)

        return OwnerChannel(modality_pb2_grpc.ModalityServiceStub(channel), identity, channel.close)

    return connect
