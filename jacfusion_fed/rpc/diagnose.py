"""Name the likely cause of a failed connection, from what the client can check itself.

gRPC reports every TLS failure on the client side as ``UNAVAILABLE`` ("failed to connect",
"Socket closed", "Handshake failed", "Hostname Verification Check failed"), with the real
reason at best in C-core's log. :func:`diagnose_tls_failure` checks, in order:

1. the address (nothing listening, or a plaintext/TLS mismatch, by one probe connection);
2. the local files: the CA certificate, the client certificate (present, issued by that CA,
   valid now, naming a role);
3. the server: one TLS handshake with those files; its certificate must come from the same CA
   and name the expected peer (the coordinator, or the owner of a given modality).

It returns one line for the CLI to print (never raises for a failed check).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from jacfusion_fed.privacy.certs import certificate_identity, load_certificate
from jacfusion_fed.rpc.tls import TlsFiles

__all__ = ["diagnose_tls_failure"]

_TLS_RECORD_HANDSHAKE: Final = 0x16
_HTTP2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _split(target: str) -> tuple[str, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _speaks_tls(host: str, port: int, timeout: float) -> bool | str:
    """True if the server answers a TLS ClientHello with a TLS record, False if it answers
    like a plaintext HTTP/2 server; a string on a connection error."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            try:
                with ctx.wrap_socket(sock, server_hostname=host):
                    return True
            except ssl.SSLError as exc:
                # A TLS server refusing us (e.g. wants a client certificate) still speaks TLS;
                # a plaintext server answers with an HTTP/2 frame, which is "wrong version".
                text = str(exc).lower()
                return not ("wrong version" in text or "record layer" in text
                            or "packet length" in text)  # fmt: skip
            except (OSError, TimeoutError):
                return True  # closed during the handshake: a TLS server that refused us
    except ConnectionRefusedError:
        return f"nothing listens at {host}:{port} (connection refused)"
    except OSError as exc:
        return f"cannot reach {host}:{port}: {exc}"


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_local(tls: TlsFiles) -> str | None:
    for what, path in (("CA certificate", tls.ca_cert), ("client certificate", tls.cert),
                       ("private key", tls.key)):  # fmt: skip
        if not Path(path).is_file():
            if what == "client certificate":
                return f"no client certificate: {path} does not exist (the server requires one)"
            return f"the {what} file {path} does not exist"
    try:
        ca = load_certificate(Path(tls.ca_cert))
    except ValueError as exc:
        return f"the CA file {tls.ca_cert} is not a PEM certificate: {exc}"
    try:
        cert = load_certificate(Path(tls.cert))
    except ValueError as exc:
        return f"the client certificate {tls.cert} is unreadable: {exc}"
    if not _issued_by(cert, ca):
        return (
            f"your certificate {tls.cert} was issued by {cert.issuer.rfc4514_string()!r}, not "
            f"by the CA in {tls.ca_cert} ({ca.subject.rfc4514_string()!r}): certificates from "
            "another deployment's CA are refused"
        )
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        return f"your certificate {tls.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"your certificate {tls.cert} is not valid before {cert.not_valid_before_utc}"
    try:
        certificate_identity(cert)
    except ValueError as exc:
        return f"your certificate {tls.cert} names no role: {exc}"
    return None


def _check_server(
    host: str, port: int, tls: TlsFiles, expected: str, modality: str | None, timeout: float
) -> str | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified below, to say what is wrong
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host) as tls_sock:  # fmt: skip
            der = tls_sock.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        return (
            f"the TLS handshake with {host}:{port} failed ({exc}); the server did not accept "
            "your certificate (issued by another CA, expired, or revoked there)"
        )
    if not der:
        return None
    server = x509.load_der_x509_certificate(der)
    ca = load_certificate(Path(tls.ca_cert))
    if not _issued_by(server, ca):
        return (
            f"the server at {host}:{port} presents a certificate issued by "
            f"{server.issuer.rfc4514_string()!r}, not by your CA {tls.ca_cert}: it belongs to "
            "another deployment, or your CA file is the wrong one"
        )
    try:
        role, name, served = certificate_identity(server)
    except ValueError as exc:
        return f"the server at {host}:{port} has a certificate without a role: {exc}"
    what = f"{role} {name!r}" + (f" (modality {served!r})" if served else "")
    if role != expected or (modality is not None and served != modality):
        want = f"the owner of modality {modality!r}" if modality else f"the {expected}"
        return (
            f"{host}:{port} is the {what}, not {want}: check the address (owner addresses "
            "swapped, or the wrong port)"
        )
    return None


def diagnose_tls_failure(
    target: str,
    tls: TlsFiles | None,
    error: BaseException | str | None = None,
    *,
    expected_role: str = "coordinator",
    modality: str | None = None,
    timeout: float = 2.0,
) -> str:
    """One line naming the likely cause of a failed connection to ``target``.

    Args:
        target: ``host:port`` that was called.
        tls: the client's certificate files, or ``None`` for a plaintext (``--insecure``)
            channel.
        error: what gRPC reported (kept at the end of the line when nothing better is found).
        expected_role: the role the server should have (``coordinator`` or ``owner``).
        modality: for an owner, the modality it should serve.
        timeout: seconds per probe connection.
    """
    said = f" ({error})" if error else ""
    address = _split(target)
    if address is None:
        return f"{target!r} is not a host:port address"
    host, port = address
    speaks = _speaks_tls(host, port, timeout)
    if isinstance(speaks, str):
        return speaks
    if tls is None:
        if speaks:
            return (
                f"{target} requires TLS, but the call was made in plaintext (--insecure): "
                "pass the certificate directory (--tls) instead"
            )
        return f"the call to {target} failed{said}"
    if not speaks:
        return (
            f"{target} serves plaintext (started with --insecure), but the call used TLS: "
            "use --insecure on both sides (loopback only) or start the server with --tls"
        )
    local = _check_local(tls)
    if local is not None:
        return local
    remote = _check_server(host, port, tls, expected_role, modality, timeout)
    if remote is not None:
        return remote
    return f"the connection to {target} failed although the certificates check out{said}"
