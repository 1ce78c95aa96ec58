"""The likely cause of a failed connection, from what the CLI can check locally.

gRPC reports a refused TLS handshake as ``UNAVAILABLE`` with little more (``Socket closed``,
``Handshake failed``, ``: OK``). :func:`likely_cause` checks the CA file, our certificate's
issuer and role, and the address with one plain TCP connect and one TLS handshake of its own
(no RPC), and names the mismatch: nothing listening, plaintext against TLS (or the reverse),
a foreign CA on either side, our certificate refused, or the address of another service.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path
from typing import Any

__all__ = ["likely_cause"]

_PLAINTEXT_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
_REFUSED_CLIENT_REASONS = (
    "CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
    "HANDSHAKE_FAILURE", "DECRYPT_ERROR", "ACCESS_DENIED",
)  # fmt: skip


def _split(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {target!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _connect(target: str, timeout: float) -> socket.socket | str:
    try:
        return socket.create_connection(_split(target), timeout=timeout)
    except ConnectionRefusedError:
        return f"nothing is listening on {target} (wrong address, or the service is not running)"
    except OSError as exc:
        return f"cannot reach {target}: {exc.strerror or exc}"


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        return any(r in str(exc) for r in _REFUSED_CLIENT_REASONS)
    except OSError:
        return False


def _local_certificate_problem(tls: Any, role: str) -> str | None:
    from cryptography.exceptions import InvalidSignature

    from jacfusion_fed.privacy.certs import certificate_identity, load_certificate

    ca = load_certificate(Path(tls.ca_cert))
    cert = load_certificate(Path(tls.cert))
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"{tls.cert} was not issued by the CA in {tls.ca_cert} (files from two deployments?)"
    try:
        got, name, modality = certificate_identity(cert)
    except ValueError as exc:
        return f"{tls.cert}: {exc}"
    if got != role:
        mod = f" (modality {modality!r})" if modality else ""
        return f"{tls.cert} belongs to {got} {name!r}{mod}; this command needs a {role} certificate"
    return None


def _tls_probe(sock: socket.socket, target: str, tls: Any, expected: str) -> str | None:
    from jacfusion_fed.privacy.certs import certificate_identity, load_certificate

    host, _ = _split(target)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the identity is checked from the role URI below
    ctx.load_verify_locations(cafile=str(tls.ca_cert))
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
            tls_sock.settimeout(2.0)
            with contextlib.suppress(TimeoutError):  # TLS 1.3: a refused client certificate
                tls_sock.recv(1)  # shows up as an alert on the first read
    except ssl.SSLCertVerificationError:
        return f"the server at {target} has a certificate from another CA than {tls.ca_cert}"
    except ssl.SSLError as exc:
        text = str(exc)
        if any(r in text for r in _PLAINTEXT_REASONS):
            return f"{target} speaks plain text (started with --insecure?): pass --insecure"
        if any(r in text for r in _REFUSED_CLIENT_REASONS):
            return f"the server at {target} refused {tls.cert} (issued by another CA than its own?)"
        return f"TLS handshake with {target} failed: {exc.reason or text}"
    except OSError as exc:
        return f"the connection to {target} broke during the handshake: {exc.strerror or exc}"
    if der:
        got, name, modality = certificate_identity(load_certificate(der))
        if got != expected:
            mod = f" of modality {modality!r}" if modality else ""
            return f"{target} is the {got} {name!r}{mod}, not the {expected} (wrong address?)"
    return None


def likely_cause(
    target: str, security: Any, *, role: str = "requester", server: str = "coordinator"
) -> str | None:
    """The likely cause of a failed call to ``target`` (``None`` when no check finds one).

    ``role`` is the role our certificate must have, ``server`` the role of the server's.
    """
    from jacfusion_fed.rpc.tls import Insecure

    try:
        conn = _connect(target, timeout=3.0)
        if isinstance(conn, str):
            return conn
        host, _ = _split(target)
        if isinstance(security, Insecure):
            with conn:
                if _speaks_tls(conn, host):
                    return f"{target} speaks TLS: pass --tls DIR instead of --insecure"
            return None
        problem = _local_certificate_problem(security, role)
        if problem is not None:
            conn.close()
            return problem
        with conn:
            return _tls_probe(conn, target, security, server)
    except Exception:  # a hint is best effort: never hide the original error behind a new one
        return None
