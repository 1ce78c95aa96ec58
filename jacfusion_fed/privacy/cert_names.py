"""Names in a deployment's certificates: roles, principals, modalities, host SANs.

The pure naming rules shared by :mod:`jacfusion_fed.privacy.certs` (which issues
certificates) and :mod:`jacfusion_fed.rpc` (which reads them and binds servers): the
``jacfusion://<role>/<subject>`` identity URI, the fixed internal server names our gRPC
clients require (``<modality>.owner.jacfusion.internal``, ``coordinator.jacfusion.internal``)
and the host names / IP addresses a certificate may name for Flower's checks.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "COORDINATOR_SERVER_NAME",
    "DEFAULT_HOSTS",
    "MODALITY_NAME_RE",
    "ROLES",
    "URI_SCHEME",
    "Role",
    "certificate_identity",
    "load_certificate",
    "owner_server_name",
    "role_uri",
    "validate_host",
    "validate_modality_name",
    "validate_principal_name",
]

Role = Literal["owner", "coordinator", "requester"]
ROLES: tuple[Role, ...] = ("owner", "coordinator", "requester")
URI_SCHEME = "jacfusion"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
MODALITY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
COORDINATOR_SERVER_NAME = "coordinator.jacfusion.internal"


def validate_modality_name(modality: str) -> str:
    """Return ``modality`` if it is a valid modality name, else raise ``ValueError``."""
    if not isinstance(modality, str) or not MODALITY_NAME_RE.match(modality):
        raise ValueError(
            f"invalid modality name {modality!r}: must match {MODALITY_NAME_RE.pattern} "
            "(lowercase letters, digits, '_' and '-'; it becomes a DNS label)"
        )
    return modality


def validate_principal_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid principal name {name!r}: must match {_NAME_RE.pattern}")
    return name


def owner_server_name(modality: str) -> str:
    """The DNS SAN an owner's certificate carries for its modality.

    A coordinator connecting to the owner of ``modality`` sets this as the TLS target name,
    so gRPC refuses any server whose certificate was issued for another modality.
    """
    return f"{validate_modality_name(modality)}.owner.jacfusion.internal"


def role_uri(role: Role, subject: str) -> str:
    """``jacfusion://<role>/<subject>`` (subject = modality for owners, else the name)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return f"{URI_SCHEME}://{role}/{subject}"


_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def validate_host(host: str) -> str:
    """Return ``host`` if it is an IP address or a DNS host name, else raise ``ValueError``.

    IPv6 literals may be given in brackets (``[::1]``); the brackets are removed. A DNS name
    is 1-253 characters of dot-separated labels (letters, digits, ``-``; no leading or
    trailing ``-``); a trailing dot is dropped.
    """
    if not isinstance(host, str) or not host.strip():
        raise ValueError("empty host name")
    text = host.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = text.rstrip(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.match(label) for label in name.split(".")):
        raise ValueError(
            f"invalid host {host!r}: expected an IP address or a DNS name "
            "(labels of letters, digits and '-', separated by dots)"
        )
    if name.replace(".", "").isdigit():
        raise ValueError(f"invalid host {host!r}: looks like a malformed IP address")
    return name.lower()


def load_certificate(data: bytes | str | Path) -> x509.Certificate:
    """Load a certificate from PEM/DER bytes or a file path."""
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def certificate_identity(cert: x509.Certificate) -> tuple[Role, str, str | None]:
    """``(role, name, modality)`` named by a certificate; ``ValueError`` if ambiguous/missing.

    The role and modality come from the single ``jacfusion://`` SAN URI; the name from the CN.
    The subject's OU, when present, must equal the role.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        uris = []
    ours = [u for u in uris if u.startswith(f"{URI_SCHEME}://")]
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if len(ours) != 1:
        raise ValueError(
            f"certificate CN={cn!r} must carry exactly one {URI_SCHEME}:// SAN URI, "
            f"found {len(ours)}"
        )
    rest = ours[0][len(URI_SCHEME) + 3 :]
    role, _, subject = rest.partition("/")
    if role not in ROLES or not subject or "/" in subject:
        raise ValueError(f"certificate CN={cn!r}: malformed role URI {ours[0]!r}")
    ous = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    if ous and ous != [role]:
        raise ValueError(f"certificate CN={cn!r}: OU {ous} disagrees with role URI {ours[0]!r}")
    if not cn:
        raise ValueError(f"certificate with role URI {ours[0]!r} has no common name")
    if role == "owner":
        return role, cn, validate_modality_name(subject)
    if subject != cn:
        raise ValueError(f"certificate CN={cn!r} disagrees with role URI {ours[0]!r}")
    return role, cn, None
