"""Deployment certificates: chain, SANs, identities, expiry, file permissions, Flower keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from jacfusion_fed.privacy.certs import (
    COORDINATOR_SERVER_NAME,
    CertificateAuthority,
    DeploymentCerts,
    certificate_identity,
    generate_deployment_certs,
    generate_supernode_auth_keys,
    load_certificate,
    owner_server_name,
    validate_modality_name,
)

OWNERS = {"cardiology": "ecg", "radiology": "xray"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> DeploymentCerts:
    return generate_deployment_certs(
        tmp_path_factory.mktemp("pki") / "deploy", OWNERS, ["alice", "bob"], days=30
    )


def _ca(d: DeploymentCerts) -> x509.Certificate:
    return load_certificate(d.ca_dir / "ca.pem")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _server_verify(ca: x509.Certificate, cert: x509.Certificate, name: str) -> None:
    subject: x509.verification.Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(cert, [])


def _client_verify(ca: x509.Certificate, cert: x509.Certificate) -> None:
    PolicyBuilder().store(Store([ca])).build_client_verifier().verify(cert, [])


def test_layout_and_manifest(deployment: DeploymentCerts) -> None:
    root = deployment.root
    for d in [deployment.coordinator_dir, *deployment.owner_dirs.values()]:
        assert {"ca.pem", "cert.pem", "key.pem"} <= {p.name for p in d.iterdir()}
    for d in deployment.owner_dirs.values():
        assert (d / "supernode_auth.key").exists() and (d / "supernode_auth.pub").exists()
    assert set(deployment.requester_dirs) == {"alice", "bob"}
    manifest = json.loads(deployment.manifest.read_text())
    roles = {(e["role"], e["name"], e["modality"]) for e in manifest["principals"]}
    assert roles == {
        ("coordinator", "coordinator", None),
        ("owner", "cardiology", "ecg"),
        ("owner", "radiology", "xray"),
        ("requester", "alice", None),
        ("requester", "bob", None),
    }
    assert not list(root.rglob("*.tmp")), "no temporary files may be left behind"


def test_chain_verifies_and_sans(deployment: DeploymentCerts) -> None:
    ca = _ca(deployment)
    for name, modality in OWNERS.items():
        cert = load_certificate(deployment.owner_dirs[name] / "cert.pem")
        for host in ("localhost", "127.0.0.1", owner_server_name(modality)):
            _server_verify(ca, cert, host)
        _client_verify(ca, cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"jacfusion://owner/{modality}"
        ]
        ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        assert [a.value for a in ou] == ["owner"]
        # An owner certificate is not valid for another modality's server name.
        other = "xray" if modality == "ecg" else "ecg"
        with pytest.raises(VerificationError):
            _server_verify(ca, cert, owner_server_name(other))
    coord = load_certificate(deployment.coordinator_dir / "cert.pem")
    _server_verify(ca, coord, COORDINATOR_SERVER_NAME)
    _server_verify(ca, coord, "127.0.0.1")
    req = load_certificate(deployment.requester_dirs["alice"] / "cert.pem")
    _client_verify(ca, req)
    eku = req.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH], "requesters cannot serve"
    with pytest.raises(VerificationError):
        _server_verify(ca, req, "localhost")


def test_identities_extractable(deployment: DeploymentCerts) -> None:
    assert certificate_identity(
        load_certificate(deployment.owner_dirs["radiology"] / "cert.pem")
    ) == ("owner", "radiology", "xray")
    assert certificate_identity(load_certificate(deployment.coordinator_dir / "cert.pem")) == (
        "coordinator",
        "coordinator",
        None,
    )
    assert certificate_identity(
        load_certificate((deployment.requester_dirs["bob"] / "cert.pem").read_bytes())
    ) == ("requester", "bob", None)


def test_key_files_are_owner_only(deployment: DeploymentCerts) -> None:
    keys = [deployment.ca_dir / "ca.key", deployment.coordinator_dir / "key.pem"]
    for d in deployment.owner_dirs.values():
        keys += [d / "key.pem", d / "supernode_auth.key"]
    keys += [d / "key.pem" for d in deployment.requester_dirs.values()]
    for key in keys:
        assert _mode(key) == 0o600, key
    for public in [deployment.ca_dir / "ca.pem", deployment.coordinator_dir / "cert.pem"]:
        assert _mode(public) == 0o644
    for d in [deployment.root, deployment.ca_dir, *deployment.owner_dirs.values()]:
        assert _mode(d) == 0o700, d


def test_expired_certificate_is_expired() -> None:
    ca = CertificateAuthority.create()
    issued = ca.issue("coordinator", "old", expired=True)
    now = dt.datetime.now(dt.timezone.utc)
    assert issued.certificate.not_valid_after_utc < now
    with pytest.raises(VerificationError):
        _client_verify(ca.certificate, issued.certificate)
    fresh = ca.issue("coordinator", "new", days=1)
    _client_verify(ca.certificate, fresh.certificate)


def test_cert_from_another_ca_does_not_verify() -> None:
    ours, theirs = CertificateAuthority.create(), CertificateAuthority.create("other")
    foreign = theirs.issue("coordinator", "coordinator")
    with pytest.raises(VerificationError):
        _client_verify(ours.certificate, foreign.certificate)


def test_ca_write_and_load(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    cert_path, key_path = ca.write(tmp_path / "ca")
    assert _mode(key_path) == 0o600
    again = CertificateAuthority.load(cert_path, key_path)
    issued = again.issue("requester", "carol")
    _client_verify(ca.certificate, issued.certificate)


def test_deployment_with_existing_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    d = generate_deployment_certs(tmp_path, {"o": "m"}, [], ca=ca)
    assert load_certificate(d.ca_dir / "ca.pem") == ca.certificate
    assert d.requester_dirs == {}


def test_supernode_keys_match_flower() -> None:
    keys = generate_supernode_auth_keys()
    assert keys.private_openssh.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(keys.private_openssh, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public = serialization.load_ssh_public_key(keys.public_openssh)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()


def test_supernode_keys_load_with_flower_loaders(deployment: DeploymentCerts) -> None:
    register = pytest.importorskip("flwr.cli.supernode.register")
    d = deployment.owner_dirs["cardiology"]
    assert register.try_load_public_key(d / "supernode_auth.pub")
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    key = serialization.load_ssh_private_key((d / "supernode_auth.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(key.public_key())


@pytest.mark.parametrize("bad", ["", "Audio", "a.b", "a/b", "-x", "x" * 64, "é"])
def test_invalid_modality_names(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid modality name"):
        validate_modality_name(bad)


def test_issue_argument_checks(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(ValueError, match="needs a modality"):
        ca.issue("owner", "o")
    with pytest.raises(ValueError, match="carries no modality"):
        ca.issue("requester", "r", modality="ecg")
    with pytest.raises(ValueError, match="unknown role"):
        ca.issue("admin", "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid principal name"):
        ca.issue("requester", "../etc")
    with pytest.raises(ValueError, match="unique"):
        generate_deployment_certs(tmp_path / "d", {"a": "m"}, requesters=["a"])
    assert not (tmp_path / "d").exists()


def test_several_sites_of_one_modality_get_their_own_identities(tmp_path: Path) -> None:
    out = generate_deployment_certs(tmp_path / "d", {"site-a": "ecg", "site-b": "ecg"})
    assert out is not None
    identities = []
    for site in ("site-a", "site-b"):
        pem = (tmp_path / "d" / "owners" / site / "cert.pem").read_bytes()
        identities.append(certificate_identity(x509.load_pem_x509_certificate(pem)))
        assert (tmp_path / "d" / "owners" / site / "supernode_auth.key").exists()
    assert identities == [("owner", "site-a", "ecg"), ("owner", "site-b", "ecg")]


def test_identity_rejects_ambiguous_certs() -> None:
    ca = CertificateAuthority.create()
    good = ca.issue("owner", "o", modality="ecg").certificate
    builder = (
        x509.CertificateBuilder()
        .issuer_name(ca.certificate.subject)
        .public_key(good.public_key())
        .serial_number(1)
        .not_valid_before(good.not_valid_before_utc)
        .not_valid_after(good.not_valid_after_utc)
    )

    def make(ou: str, uris: list[str]) -> x509.Certificate:
        from cryptography.hazmat.primitives import hashes

        return (
            builder.subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                        x509.NameAttribute(NameOID.COMMON_NAME, "o"),
                    ]
                )
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=False,
            )
            .sign(ca.key, hashes.SHA256())
        )

    with pytest.raises(ValueError, match="OU"):
        certificate_identity(make("requester", ["jacfusion://owner/ecg"]))
    with pytest.raises(ValueError, match="exactly one"):
        certificate_identity(make("owner", ["jacfusion://owner/ecg", "jacfusion://owner/x"]))
    with pytest.raises(ValueError, match="malformed"):
        certificate_identity(make("owner", ["jacfusion://root/ecg"]))
    with pytest.raises(ValueError, match="disagrees"):
        certificate_identity(make("requester", ["jacfusion://requester/someone-else"]))
    assert certificate_identity(make("owner", ["jacfusion://owner/ecg"])) == ("owner", "o", "ecg")
