"""Who is calling: the :class:`Principal` a peer certificate names.

The TLS handshake (see :mod:`jacfusion_fed.rpc.tls`) proves that a peer holds a certificate
issued by the deployment CA; this module turns that certificate into a :class:`Principal`
(role ``owner``/``coordinator``/``requester``, name, modality). Servicers read the caller of
the current call with :func:`caller`; what a principal may call is decided by
:mod:`jacfusion_fed.rpc.auth`.

A missing or unusable identity is ``AuthError(UNAUTHENTICATED)``: a plaintext transport, no
client certificate, a certificate without a valid ``jacfusion://`` role URI, or one that fails
verification. The message names what was wrong.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from jacfusion_fed.privacy.cert_names import Role, certificate_identity, load_certificate

__all__ = [
    "AuthError",
    "Principal",
    "caller",
    "is_tls",
    "principal_from_certificate",
    "principal_from_context",
    "remember_caller",
]


@dataclass(frozen=True)
class Principal:
    """An authenticated party: its role, name (certificate CN) and, for owners, modality."""

    role: Role
    name: str
    modality: str | None = None

    def describe(self) -> str:
        """``owner 'cardiology' (modality 'ecg')`` etc., for messages."""
        text = f"{self.role} {self.name!r}"
        return f"{text} (modality {self.modality!r})" if self.modality else text


class AuthError(Exception):
    """Authentication or authorisation failed; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def principal_from_certificate(cert: x509.Certificate | bytes | str | Path) -> Principal:
    """The :class:`Principal` a certificate names; ``AuthError(UNAUTHENTICATED)`` if none."""
    if not isinstance(cert, x509.Certificate):
        try:
            cert = load_certificate(cert)
        except ValueError as exc:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, f"unreadable certificate: {exc}"
            ) from exc
    try:
        role, name, modality = certificate_identity(cert)
    except ValueError as exc:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc
    return Principal(role, name, modality)


@functools.lru_cache(maxsize=512)
def _principal_from_pem(pem: bytes) -> Principal:
    return principal_from_certificate(pem)


def _verify_client(pem: bytes, store: Store) -> None:
    cert = x509.load_pem_x509_certificate(pem)
    verifier = (
        PolicyBuilder().store(store).time(dt.datetime.now(dt.timezone.utc)).build_client_verifier()
    )
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED, f"client certificate failed verification: {exc}"
        ) from exc


def _auth_value(auth: Mapping[str, Iterable[bytes]], key: str) -> bytes | None:
    values = list(auth.get(key, ()))
    return values[0] if values else None


def is_tls(context: grpc.ServicerContext) -> bool:
    """Whether the current call came over a TLS-protected transport."""
    return _auth_value(context.auth_context(), "transport_security_type") == b"ssl"


_call_principals: weakref.WeakKeyDictionary[Any, Principal] = weakref.WeakKeyDictionary()
_call_principals_lock = threading.Lock()


def remember_caller(context: grpc.ServicerContext, principal: Principal) -> None:
    """Record ``principal`` as the caller of this call (what :func:`caller` then returns).

    The interceptor calls this once it has authorised the call, so that an insecure
    principal (plaintext development mode) is seen by the servicer too.
    """
    with _call_principals_lock:
        _call_principals[context] = principal


def caller(context: grpc.ServicerContext) -> Principal:
    """The principal of the current call, for use inside servicer methods.

    Returns what :class:`~jacfusion_fed.rpc.auth.AuthInterceptor` established for this call
    (including its ``insecure_principal``), else derives it from the client certificate;
    aborts the RPC with ``UNAUTHENTICATED`` when there is none.
    """
    with _call_principals_lock:
        known = _call_principals.get(context)
    if known is not None:
        return known
    try:
        return principal_from_context(context)
    except AuthError as exc:
        context.abort(exc.code, exc.details)
        raise  # unreachable: abort raises


def principal_from_context(
    context: grpc.ServicerContext, *, ca_store: Store | None = None
) -> Principal:
    """The caller's :class:`Principal`, from its TLS-verified client certificate.

    Args:
        context: the servicer context.
        ca_store: when given, the certificate is verified again against this store
            (defence in depth, e.g. for servers whose credentials do not verify clients).

    Raises:
        AuthError: ``UNAUTHENTICATED`` when the transport is not TLS, no client certificate
            was presented, or the certificate names no valid role.
    """
    auth = context.auth_context()
    transport = _auth_value(auth, "transport_security_type")
    if transport != b"ssl":
        kind = transport.decode(errors="replace") if transport else "plaintext"
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"no client certificate: the connection is not TLS-protected (transport {kind!r})",
        )
    pem = _auth_value(auth, "x509_pem_cert")
    if not pem:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "no client certificate presented (mutual TLS with a certificate from the "
            "deployment CA is required)",
        )
    if ca_store is not None:
        _verify_client(pem, ca_store)
    return _principal_from_pem(bytes(pem))
