"""Name the likely cause of a failed connection, from what the client can check itself.

The one place for this diagnosis: the CLI (``predict``, ``coordinator info``) prints it after a
failed call, and library users call it themselves. gRPC reports every TLS failure on the
client side as ``UNAVAILABLE`` ("failed to connect", "Socket closed", "Handshake failed",
"Hostname Verification Check failed"), with the real reason at best in C-core's log.
:func:`likely_cause` checks, in order:

1. the address (nothing listening, or a plaintext/TLS mismatch, by one probe connection);
2. the local files: the CA certificate, the client certificate (present, issued by that CA,
   valid now, naming a role, the role the caller needs) and its private key (the pair);
3. the server: one TLS handshake with those files and one read (TLS 1.3 reports a refused
   client certificate only then); its certificate must come from the same CA and name the
   expected peer (the coordinator, or the owner of a given modality).

Probes make no RPC and never raise: a check that cannot be made names no cause.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from jacfusion_fed.privacy.cert_names import certificate_identity, load_certificate
from jacfusion_fed.rpc.tls import Insecure, TlsFiles

__all__ = ["diagnose_tls_failure", "likely_cause"]

#: What an OpenSSL client reports when the server answered a ClientHello in plain HTTP/2.
_PLAINTEXT_REASONS: Final = ("wrong version", "record layer", "packet length")
#: Alerts of a TLS server that refused our certificate (or the handshake as a whole).
_REFUSED_REASONS: Final = (
    "certificate_required",
    "unknown_ca",
    "bad_certificate",
    "certificate_unknown",
    "handshake_failure",
    "decrypt_error",
    "access_denied",
    "certificate_expired",
    "certificate_revoked",
)


def _split(target: str) -> tuple[str, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _speaks_tls(host: str, port: int, target: str, timeout: float) -> bool | str:
    """True if the server answers a TLS ClientHello with a TLS record, False if it answers
    like a plaintext HTTP/2 server; a string naming the cause on a connection error."""
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
                return not any(reason in str(exc).lower() for reason in _PLAINTEXT_REASONS)
            except OSError:
                return True  # closed during the handshake: a TLS server that refused us
    except ConnectionRefusedError:
        return f"nothing is listening on {target} (wrong address, or the service is not running)"
    except OSError as exc:
        return f"cannot reach {target}: {exc.strerror or exc}"


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _files(tls: TlsFiles | str | Path) -> tuple[Path, Path, Path]:
    """``(ca, cert, key)`` of a :class:`TlsFiles` or a certificate directory (which may lack
    files: naming the missing one is a diagnosis)."""
    if isinstance(tls, TlsFiles):
        return Path(tls.ca_cert), Path(tls.cert), Path(tls.key)
    d = Path(tls).expanduser()
    return d / "ca.pem", d / "cert.pem", d / "key.pem"


def _check_local(
    ca_path: Path, cert_path: Path, key_path: Path, own_role: str | None
) -> str | None:
    for what, path in (
        ("CA certificate", ca_path),
        ("client certificate", cert_path),
        ("private key", key_path),
    ):
        if not path.is_file():
            if what == "client certificate":
                return f"no client certificate: {path} does not exist (the server requires one)"
            return f"the {what} file {path} does not exist"
    try:
        ca = load_certificate(ca_path)
    except ValueError as exc:
        return f"the CA file {ca_path} is not a PEM certificate: {exc}"
    try:
        cert = load_certificate(cert_path)
    except ValueError as exc:
        return f"the client certificate {cert_path} is unreadable: {exc}"
    if not _issued_by(cert, ca):
        return (
            f"your certificate {cert_path} was not issued by the CA in {ca_path} "
            f"({ca.subject.rfc4514_string()!r}) but by {cert.issuer.rfc4514_string()!r}: files "
            "from two deployments? (certificates of another deployment's CA are refused)"
        )
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        return f"your certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"your certificate {cert_path} is not valid before {cert.not_valid_before_utc}"
    try:
        role, name, modality = certificate_identity(cert)
    except ValueError as exc:
        return f"your certificate {cert_path} names no role: {exc}"
    if own_role is not None and role != own_role:
        mod = f" (modality {modality!r})" if modality else ""
        return (
            f"{cert_path} belongs to the {role} {name!r}{mod}; this call needs a {own_role} "
            "certificate"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        return f"the private key {key_path} does not belong to {cert_path} ({exc})"
    return None


def _handshake(
    host: str, port: int, cert_path: Path, key_path: Path, timeout: float
) -> tuple[bytes | None, str | None] | str:
    """``(server certificate DER, refusal alert or None)``, or the failure as a string."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified by the caller, to say what is wrong
    ctx.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
    ctx.set_alpn_protocols(["h2"])
    refused: str | None = None
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host) as tls_sock,
        ):
            der = tls_sock.getpeercert(binary_form=True)
            tls_sock.settimeout(min(timeout, 2.0))
            try:  # TLS 1.3: a refused client certificate shows up as an alert on the first read
                with contextlib.suppress(TimeoutError):
                    tls_sock.recv(1)
            except ssl.SSLError as exc:
                if any(reason in str(exc).lower() for reason in _REFUSED_REASONS):
                    refused = exc.reason or str(exc)
            except OSError:
                pass  # closed after the handshake: nothing more to learn here
    except (OSError, ssl.SSLError) as exc:
        return str(exc)
    return der, refused


def _check_server(
    host: str,
    port: int,
    files: tuple[Path, Path, Path],
    expected: str,
    modality: str | None,
    timeout: float,
) -> str | None:
    ca_path, cert_path, key_path = files
    shaken = _handshake(host, port, cert_path, key_path, timeout)
    if isinstance(shaken, str):
        return (
            f"the TLS handshake with {host}:{port} failed ({shaken}); the server did not accept "
            f"your certificate {cert_path} (issued by another CA than its own, expired, or "
            "revoked there)"
        )
    der, refused = shaken
    if der:
        server = x509.load_der_x509_certificate(der)
        if not _issued_by(server, load_certificate(ca_path)):
            return (
                f"the server at {host}:{port} has a certificate issued by "
                f"{server.issuer.rfc4514_string()!r}, not by your CA {ca_path} (another CA: a "
                "server of another deployment, or the wrong CA file)"
            )
        try:
            role, name, served = certificate_identity(server)
        except ValueError as exc:
            return f"the server at {host}:{port} has a certificate without a role: {exc}"
        what = f"{role} {name!r}" + (f" (modality {served!r})" if served else "")
        if role != expected or (modality is not None and served != modality):
            want = f"the owner of modality {modality!r}" if modality else f"the {expected}"
            return (
                f"{host}:{port} is the {what}, not {want}: wrong address (owner addresses "
                "swapped, or the wrong port)"
            )
    if refused is not None:
        return (
            f"the server at {host}:{port} refused your certificate {cert_path} ({refused}: "
            "issued by another CA than its own, expired, or revoked there)"
        )
    return None


def likely_cause(
    target: str,
    tls: TlsFiles | Insecure | str | Path | None,
    *,
    expected_role: str = "coordinator",
    modality: str | None = None,
    own_role: str | None = None,
    timeout: float = 2.0,
) -> str | None:
    """One line naming the likely cause of a failed call to ``target``, or ``None`` when no
    check finds one (the server's own error message is then the best there is).

    Args:
        target: ``host:port`` that was called.
        tls: the client's certificate files (or their directory), or ``None``/``INSECURE``
            for a plaintext (``--insecure``) channel.
        expected_role: the role the server should have (``coordinator`` or ``owner``).
        modality: for an owner, the modality it should serve.
        own_role: the role our certificate must have (e.g. ``requester``); ``None``: any.
        timeout: seconds per probe connection.
    """
    address = _split(target)
    if address is None:
        return f"{target!r} is not a host:port address"
    host, port = address
    try:
        speaks = _speaks_tls(host, port, target, timeout)
        if isinstance(speaks, str):
            return speaks
        if tls is None or isinstance(tls, Insecure):
            if speaks:
                return (
                    f"{target} speaks TLS, but the call was made in plain text (--insecure): "
                    "pass the certificate directory (--tls DIR) instead"
                )
            return None
        if not speaks:
            return (
                f"{target} serves plain text (started with --insecure), but the call used TLS: "
                "pass --insecure on both sides (loopback only) or start the server with --tls"
            )
        files = _files(tls)
        local = _check_local(*files, own_role)
        if local is not None:
            return local
        return _check_server(host, port, files, expected_role, modality, timeout)
    except Exception:  # best effort: never hide the original error behind a new one
        return None


def diagnose_tls_failure(
    target: str,
    tls: TlsFiles | Insecure | str | Path | None,
    error: BaseException | str | None = None,
    *,
    expected_role: str = "coordinator",
    modality: str | None = None,
    own_role: str | None = None,
    timeout: float = 2.0,
) -> str:
    """:func:`likely_cause` as one line that is always there: when no check names a cause,
    what gRPC reported (``error``) with what was ruled out."""
    cause = likely_cause(
        target,
        tls,
        expected_role=expected_role,
        modality=modality,
        own_role=own_role,
        timeout=timeout,
    )
    if cause is not None:
        return cause
    said = f" ({error})" if error else ""
    if tls is None or isinstance(tls, Insecure):
        return f"the call to {target} failed{said}"
    return f"the connection to {target} failed although the certificates check out{said}"
