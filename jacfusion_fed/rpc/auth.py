"""Authorisation: what an authenticated peer may call, and which peer we are talking to.

Who a peer is comes from its certificate (:mod:`jacfusion_fed.rpc.identity`, a
:class:`~jacfusion_fed.rpc.identity.Principal`); this module enforces per-RPC rules on it:

* servers: :class:`AuthInterceptor` with an :class:`RpcPolicy` (fail-closed: a method not in
  the policy is denied to everyone; the deployment's policies are in
  :mod:`jacfusion_fed.rpc.policies`), or :func:`require_roles` on individual servicer methods;
  servicers read the caller with :func:`jacfusion_fed.rpc.identity.caller`;
* start-up: :func:`check_own_certificate` refuses to serve under another role's certificate;
* clients (the coordinator): :func:`connect_owner` checks that an owner's *server*
  certificate names the expected modality before use, and pins that on every later
  handshake through the TLS target name (:func:`jacfusion_fed.privacy.certs.owner_server_name`).

Status codes: ``UNAUTHENTICATED`` when no usable identity is presented;
``PERMISSION_DENIED`` when the identity is known but not allowed. Both messages name the
method, the identity and what was wrong.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from cryptography import x509
from cryptography.x509.verification import Store

from jacfusion_fed.privacy.cert_names import ROLES, Role, load_certificate, owner_server_name
from jacfusion_fed.rpc.identity import (
    AuthError,
    Principal,
    is_tls,
    principal_from_certificate,
    principal_from_context,
    remember_caller,
)
from jacfusion_fed.rpc.tls import TlsFiles, TransportOptions, create_channel

__all__ = [
    "AuthInterceptor",
    "RpcPolicy",
    "check_own_certificate",
    "connect_owner",
    "fetch_server_principal",
    "require_roles",
]


@dataclass(frozen=True)
class RpcPolicy:
    """Which roles may call which methods.

    Keys are full method names (``/jacfusion.v1.FusionService/Predict``) or a service
    wildcard (``/jacfusion.v1.FusionService/*``); an exact entry wins over the wildcard. A
    method matching neither is denied to everyone (fail-closed).
    """

    rules: Mapping[str, frozenset[Role]]

    @classmethod
    def of(cls, rules: Mapping[str, Collection[Role]]) -> RpcPolicy:
        """Build a policy, validating role names."""
        checked: dict[str, frozenset[Role]] = {}
        for method, roles in rules.items():
            if not method.startswith("/"):
                raise ValueError(f"method {method!r} must look like /package.Service/Method")
            unknown = set(roles) - set(ROLES)
            if unknown:
                raise ValueError(f"unknown roles {sorted(unknown)} for {method}")
            checked[method] = frozenset(roles)
        return cls(checked)

    def allowed_roles(self, method: str) -> frozenset[Role] | None:
        """Roles allowed for ``method``; ``None`` if the policy does not mention it."""
        if method in self.rules:
            return self.rules[method]
        service = method.rsplit("/", 1)[0]
        return self.rules.get(f"{service}/*")

    def check(self, method: str, principal: Principal) -> None:
        """Raise ``AuthError(PERMISSION_DENIED)`` unless ``principal`` may call ``method``."""
        allowed = self.allowed_roles(method)
        if allowed is None:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is not open to any caller (not in the server's policy); "
                f"caller: {principal.describe()}",
            )
        if principal.role not in allowed:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.describe()} may not call {method}; allowed roles: "
                f"{', '.join(sorted(allowed)) or 'none'}",
            )


def _wrap_handler(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    """Return a handler of the same kind whose behaviour runs ``check`` first.

    For unary requests the request bytes are parsed only *after* ``check`` passed (an
    unauthorised caller's bytes are never parsed), and bytes that do not parse as the
    method's request message (truncated, garbage, invalid UTF-8 in a string field) are
    answered with ``INVALID_ARGUMENT``; gRPC itself would answer ``INTERNAL`` ("Exception
    deserializing request!") before any check ran.
    """

    def guard(inner: Callable[..., Any]) -> Callable[..., Any]:
        def behavior(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return inner(request_or_iterator, context)

        return behavior

    def guard_parse(inner: Callable[..., Any], parse: Callable[[bytes], Any]) -> Callable[..., Any]:
        def behavior(request: bytes, context: grpc.ServicerContext) -> Any:
            check(context)
            try:
                message = parse(request)
            except Exception as exc:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"malformed request message ({len(request)} bytes): "
                    f"{type(exc).__name__}: {exc}"[:500],
                )
            return inner(message, context)

        return behavior

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    parse = handler.request_deserializer
    unary_kwargs = {**kwargs, "request_deserializer": None} if parse is not None else kwargs
    if handler.unary_unary is not None:
        fn = handler.unary_unary
        wrapped = guard_parse(fn, parse) if parse is not None else guard(fn)
        return grpc.unary_unary_rpc_method_handler(wrapped, **unary_kwargs)
    if handler.unary_stream is not None:
        fn = handler.unary_stream
        wrapped = guard_parse(fn, parse) if parse is not None else guard(fn)
        return grpc.unary_stream_rpc_method_handler(wrapped, **unary_kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), **kwargs)
    raise TypeError(f"unsupported RPC method handler {handler!r}")


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Server interceptor enforcing an :class:`RpcPolicy` on every RPC.

    Args:
        policy: the per-method rules.
        insecure_principal: the principal assumed for plaintext connections; only for local
            development with :data:`jacfusion_fed.rpc.tls.INSECURE` (default: refuse them).
        ca_certificate: when given, client certificates are verified again against it.
    """

    def __init__(
        self,
        policy: RpcPolicy,
        *,
        insecure_principal: Principal | None = None,
        ca_certificate: x509.Certificate | bytes | str | Path | None = None,
    ) -> None:
        self.policy = policy
        self.insecure_principal = insecure_principal
        self._store = (
            Store(
                [
                    ca_certificate
                    if isinstance(ca_certificate, x509.Certificate)
                    else load_certificate(ca_certificate)
                ]
            )
            if ca_certificate is not None
            else None
        )

    def authorize(self, method: str, context: grpc.ServicerContext) -> Principal:
        """The caller's principal if it may call ``method``; raises :class:`AuthError`."""
        if not is_tls(context) and self.insecure_principal is not None:
            principal = self.insecure_principal
        else:
            try:
                principal = principal_from_context(context, ca_store=self._store)
            except AuthError as exc:
                raise AuthError(exc.code, f"{method}: {exc.details}") from exc
        self.policy.check(method, principal)
        return principal

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's handler so that authorisation runs before the servicer."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def check(context: grpc.ServicerContext) -> None:
            try:
                principal = self.authorize(method, context)
            except AuthError as exc:
                context.abort(exc.code, exc.details)
            remember_caller(context, principal)

        return _wrap_handler(handler, check)


F = TypeVar("F", bound=Callable[..., Any])


def require_roles(*roles: Role) -> Callable[[F], F]:
    """Decorator for servicer methods ``(self, request, context)``: allow only ``roles``.

    Aborts with ``UNAUTHENTICATED`` / ``PERMISSION_DENIED`` before the method runs.
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")
    allowed = frozenset(roles)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                principal = principal_from_context(context)
            except AuthError as exc:
                context.abort(exc.code, f"{fn.__name__}: {exc.details}")
            if principal.role not in allowed:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.describe()} may not call {fn.__name__}; allowed roles: "
                    f"{', '.join(sorted(allowed))}",
                )
            return fn(self, request, context)

        return cast(F, wrapper)

    return decorate


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r} must be host:port")
    return host.strip("[]"), int(port)


def fetch_server_principal(target: str, tls: TlsFiles, *, timeout: float = 5.0) -> Principal:
    """Handshake with ``target`` (mTLS, verified against our CA) and return its principal.

    Only the TLS handshake is performed (no RPC), with our own client certificate so that
    servers requiring client authentication answer.

    Raises:
        ssl.SSLError / OSError: when the handshake fails (e.g. the certificate is not from our
            CA or has expired).
        AuthError: when the certificate names no valid role.
    """
    host, port = _split_target(target)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the identity is checked below, from the role URI
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls.ca_cert))
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        ctx.wrap_socket(sock, server_hostname=host) as tls_sock,
    ):
        der = tls_sock.getpeercert(binary_form=True)
    if not der:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"{target} presented no certificate")
    return principal_from_certificate(der)


def check_own_certificate(tls: TlsFiles, role: Role, modality: str | None = None) -> Principal:
    """Check at start-up that our own certificate has ``role`` (and ``modality``).

    An owner server calls this with its configured modality so it never serves under a
    certificate issued for another one. Raises ``ValueError`` naming the mismatch.
    """
    principal = principal_from_certificate(Path(tls.cert))
    if principal.role != role or (modality is not None and principal.modality != modality):
        raise ValueError(
            f"{tls.cert} is the certificate of {principal.describe()}, expected {role}"
            + (f" for modality {modality!r}" if modality is not None else "")
        )
    return principal


def connect_owner(
    target: str,
    tls: TlsFiles,
    modality: str,
    *,
    options: TransportOptions | None = None,
    verify_now: bool = True,
    timeout: float = 5.0,
) -> grpc.Channel:
    """Open the coordinator's channel to the owner of ``modality`` at ``target``.

    Every handshake of the returned channel requires the server certificate to carry
    :func:`owner_server_name(modality) <jacfusion_fed.privacy.certs.owner_server_name>`, which
    only that modality's owner certificate does. With ``verify_now`` (default), one handshake
    is made first to fail early with a precise message.

    Raises:
        AuthError: ``PERMISSION_DENIED`` when the server is not the owner of ``modality``.
        ssl.SSLError / OSError: when the handshake fails.
    """
    if verify_now:
        principal = fetch_server_principal(target, tls, timeout=timeout)
        if principal.role != "owner" or principal.modality != modality:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"server at {target} is {principal.describe()}, expected the owner of "
                f"modality {modality!r}",
            )
    return create_channel(target, tls, server_name=owner_server_name(modality), options=options)
