"""X.509 certificates for a jacfusion deployment, and Flower SuperNode authentication keys.

Identity model
--------------
Every certificate is issued by one deployment CA and names exactly one principal:

* a SAN URI ``jacfusion://<role>/<subject>`` where ``role`` is ``owner``, ``coordinator`` or
  ``requester`` and ``subject`` is the modality for an owner, the principal's name otherwise
  (this URI is authoritative; :mod:`jacfusion_fed.rpc.auth` reads it);
* the subject ``CN=<name>, OU=<role>, O=jacfusion`` (human-readable; must agree with the URI);
* host SANs (DNS names, IP addresses) for the machine the principal runs on. Flower checks
  them: a SuperNode (and the SuperLink's own SuperExec) verifies that the SuperLink's
  certificate names the address it dials. Each principal gets only its own hosts
  (``host_map``) plus the ones shared by all (``hosts``; ``localhost`` and ``127.0.0.1`` by
  default: the single-machine form);
* a fixed role-specific DNS name, :func:`owner_server_name`
  (``<modality>.owner.jacfusion.internal``) for owners and ``coordinator.jacfusion.internal``
  for the coordinator. Our own gRPC clients check *this* name, never the host they dial
  (gRPC option ``grpc.ssl_target_name_override``), so they work across hosts whatever the
  host SANs say, and a client can require *which* server it reaches.

Owner and coordinator certificates are valid for TLS server and client authentication
(owners serve ``ModalityService`` and are Flower SuperNodes; the coordinator serves
``FusionService``, runs the SuperLink and calls the owners); requester certificates for
client authentication only. Keys are ECDSA P-256.

Modality names must match ``[a-z0-9][a-z0-9_-]{0,62}`` (they become a DNS label).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jacfusion_fed.privacy._fileio import (
    PRIVATE_MODE,
    PUBLIC_MODE,
    ensure_private_dir,
    write_file_atomic,
)
from jacfusion_fed.privacy.cert_names import (
    COORDINATOR_SERVER_NAME,
    DEFAULT_HOSTS,
    MODALITY_NAME_RE,
    ROLES,
    URI_SCHEME,
    Role,
    certificate_identity,
    load_certificate,
    owner_server_name,
    role_uri,
    validate_host,
    validate_modality_name,
    validate_principal_name,
)

__all__ = [
    "COORDINATOR_SERVER_NAME",
    "DEFAULT_HOSTS",
    "MODALITY_NAME_RE",
    "ROLES",
    "URI_SCHEME",
    "CertificateAuthority",
    "DeploymentCerts",
    "IssuedCertificate",
    "Role",
    "SupernodeAuthKeys",
    "certificate_identity",
    "generate_deployment_certs",
    "generate_supernode_auth_keys",
    "load_certificate",
    "owner_server_name",
    "role_uri",
    "validate_host",
    "validate_modality_name",
    "write_credentials",
]

_ORG = "jacfusion"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key (PEM)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return _key_pem(self.key)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Digital signatures always; the CA also signs certificates and CRLs, a leaf agrees keys
    (ECDHE) instead."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA that issues the deployment's certificates."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        common_name: str = "jacfusion deployment CA",
        *,
        days: int = 3650,
        not_before: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """Create a new CA valid for ``days`` from ``not_before`` (default: now - 5 min)."""
        key = _new_key()
        start = not_before or (_now() - dt.timedelta(minutes=5))
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA written by :meth:`write`."""
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an EC private key")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``ca.pem`` (0644) and ``ca.key`` (0600) into ``directory`` (made 0700)."""
        directory = ensure_private_dir(Path(directory))
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        write_file_atomic(key_path, _key_pem(self.key), PRIVATE_MODE)
        write_file_atomic(cert_path, self.cert_pem, PUBLIC_MODE)
        return cert_path, key_path

    def issue(
        self,
        role: Role,
        name: str,
        *,
        modality: str | None = None,
        days: int = 365,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        expired: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a certificate for one principal.

        Args:
            role: ``"owner"``, ``"coordinator"`` or ``"requester"``.
            name: the principal's name (CN), e.g. ``"cardiology"``.
            modality: required for owners (and only for them).
            days: validity from now (ignored when ``not_after`` is given).
            hosts: DNS names / IP addresses put in the SAN, besides the role's own fixed
                name (each checked by :func:`validate_host`).
            expired: issue a certificate that expired yesterday (for tests).
            not_before, not_after: explicit validity window.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        validate_principal_name(name)
        if role == "owner":
            if modality is None:
                raise ValueError("an owner certificate needs a modality")
            subject = validate_modality_name(modality)
        else:
            if modality is not None:
                raise ValueError(f"a {role} certificate carries no modality")
            subject = name
        now = _now()
        if expired:
            start, end = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
        else:
            start = not_before or (now - dt.timedelta(minutes=5))
            end = not_after or (start + dt.timedelta(days=days))
        key = _new_key()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role_uri(role, subject))]
        extra_hosts = [validate_host(h) for h in hosts]
        if role == "owner":
            extra_hosts.append(owner_server_name(subject))
        elif role == "coordinator":
            extra_hosts.append(COORDINATOR_SERVER_NAME)
        sans.extend(_san_entries(dict.fromkeys(extra_hosts)))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role != "requester":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return IssuedCertificate(cert, key)


@dataclass(frozen=True)
class SupernodeAuthKeys:
    """A Flower SuperNode authentication key pair (EC, NIST P-384).

    ``private_openssh`` is what ``flower-supernode --auth-supernode-private-key`` loads
    (``load_ssh_private_key``); ``public_openssh`` is what ``flwr supernode register``
    takes (``load_ssh_public_key``, a NIST curve is required).
    """

    private_openssh: bytes
    public_openssh: bytes


def generate_supernode_auth_keys() -> SupernodeAuthKeys:
    """Create a SuperNode authentication key pair in the formats Flower 1.42 expects."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return SupernodeAuthKeys(private, public + b"\n")


def write_credentials(directory: Path, issued: IssuedCertificate, ca: CertificateAuthority) -> Path:
    """Write ``ca.pem``, ``cert.pem`` (0644) and ``key.pem`` (0600) into ``directory`` (0700).

    This is the layout :meth:`jacfusion_fed.rpc.tls.TlsFiles.from_dir` reads.
    """
    directory = ensure_private_dir(Path(directory))
    write_file_atomic(directory / "key.pem", issued.key_pem, PRIVATE_MODE)
    write_file_atomic(directory / "cert.pem", issued.cert_pem, PUBLIC_MODE)
    write_file_atomic(directory / "ca.pem", ca.cert_pem, PUBLIC_MODE)
    return directory


@dataclass(frozen=True)
class DeploymentCerts:
    """Paths written by :func:`generate_deployment_certs`."""

    root: Path
    ca_dir: Path
    coordinator_dir: Path
    owner_dirs: dict[str, Path]
    requester_dirs: dict[str, Path]
    manifest: Path


def generate_deployment_certs(
    out_dir: Path,
    owners: Mapping[str, str],
    requesters: Sequence[str] = ("requester",),
    *,
    coordinator: str = "coordinator",
    days: int = 365,
    ca_days: int = 3650,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    host_map: Mapping[str, Sequence[str]] | None = None,
    ca: CertificateAuthority | None = None,
) -> DeploymentCerts:
    """Create a CA and every certificate and key of a deployment under ``out_dir``.

    Layout (directories 0700, ``*.key``/``key.pem`` 0600, the rest 0644)::

        out_dir/
          manifest.json               who is who: roles, modalities, SHA-256 fingerprints, expiry
          ca/ca.pem                   CA certificate: distribute to every party
          ca/ca.key                   CA private key: keep offline, never distribute
          coordinator/ca.pem cert.pem key.pem
                                      FusionService server, ModalityService client, and the
                                      Flower SuperLink's TLS identity
                                      (--ssl-ca-certfile ca.pem --ssl-certfile cert.pem
                                       --ssl-keyfile key.pem --enable-supernode-auth)
          owners/<name>/ca.pem cert.pem key.pem
                                      ModalityService server identity for <modality>; also the
                                      SuperNode's --root-certificates ca.pem
          owners/<name>/supernode_auth.key   flower-supernode --auth-supernode-private-key
          owners/<name>/supernode_auth.pub   `flwr supernode register` (OpenSSH public key)
          requesters/<name>/ca.pem cert.pem key.pem
                                      FusionService client identity

    Args:
        out_dir: target directory (created).
        owners: owner name -> modality, e.g. ``{"cardiology": "ecg", "radiology": "xray"}``;
            several sites may share a modality.
        requesters: requester names.
        coordinator: the coordinator's name (CN).
        days: validity of the leaf certificates; ``ca_days`` of the CA.
        hosts: DNS names / IPs in every certificate's SAN (default localhost, 127.0.0.1: the
            single-machine form; pass ``()`` for a multi-host deployment).
        host_map: principal name -> its own DNS names / IPs (the machine it runs on), added
            to that principal's certificate only. The coordinator's must name every address
            the SuperLink is dialled at: the one in the owners' ``--superlink`` and the one it
            binds (its SuperExec dials ``--host``, or 127.0.0.1 when that is 0.0.0.0).
        ca: an existing CA to issue from (default: a new one, written to ``ca/``).
    """
    out_dir = Path(out_dir)
    # Several owners may hold one modality (sites with different patients, trained together
    # with FedAvg); each gets its own certificate and SuperNode key carrying that modality.
    names = [*owners, coordinator, *requesters]
    if len(set(names)) != len(names):
        raise ValueError(f"principal names must be unique, got {names}")
    own_hosts = {k: [validate_host(h) for h in v] for k, v in (host_map or {}).items()}
    unknown = sorted(set(own_hosts) - set(names))
    if unknown:
        raise ValueError(f"hosts given for unknown principals {unknown}; known: {names}")
    shared = [validate_host(h) for h in hosts]

    def hosts_of(name: str) -> list[str]:
        return list(dict.fromkeys([*shared, *own_hosts.get(name, [])]))

    ensure_private_dir(out_dir)
    ca = ca or CertificateAuthority.create(days=ca_days)
    ca_dir = out_dir / "ca"
    ca.write(ca_dir)
    manifest: dict[str, object] = {
        "ca": {"fingerprint_sha256": ca.certificate.fingerprint(hashes.SHA256()).hex()},
        "principals": [],
    }
    entries: list[dict[str, object]] = []

    def record(issued: IssuedCertificate, directory: Path, role: Role, name: str) -> None:
        _, _, modality = certificate_identity(issued.certificate)
        entries.append(
            {
                "role": role,
                "name": name,
                "modality": modality,
                "dir": directory.relative_to(out_dir).as_posix(),
                "hosts": hosts_of(name),
                "fingerprint_sha256": issued.certificate.fingerprint(hashes.SHA256()).hex(),
                "not_after": issued.certificate.not_valid_after_utc.isoformat(),
            }
        )

    coord_dir = out_dir / "coordinator"
    issued = ca.issue("coordinator", coordinator, days=days, hosts=hosts_of(coordinator))
    write_credentials(coord_dir, issued, ca)
    record(issued, coord_dir, "coordinator", coordinator)

    owner_dirs: dict[str, Path] = {}
    ensure_private_dir(out_dir / "owners")
    for name, modality in owners.items():
        directory = out_dir / "owners" / name
        issued = ca.issue("owner", name, modality=modality, days=days, hosts=hosts_of(name))
        write_credentials(directory, issued, ca)
        keys = generate_supernode_auth_keys()
        write_file_atomic(directory / "supernode_auth.key", keys.private_openssh, PRIVATE_MODE)
        write_file_atomic(directory / "supernode_auth.pub", keys.public_openssh, PUBLIC_MODE)
        owner_dirs[name] = directory
        record(issued, directory, "owner", name)

    requester_dirs: dict[str, Path] = {}
    if requesters:
        ensure_private_dir(out_dir / "requesters")
    for name in requesters:
        directory = out_dir / "requesters" / name
        issued = ca.issue("requester", name, days=days, hosts=hosts_of(name))
        write_credentials(directory, issued, ca)
        requester_dirs[name] = directory
        record(issued, directory, "requester", name)

    manifest["principals"] = entries
    manifest_path = out_dir / "manifest.json"
    write_file_atomic(
        manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), PUBLIC_MODE
    )
    return DeploymentCerts(out_dir, ca_dir, coord_dir, owner_dirs, requester_dirs, manifest_path)
