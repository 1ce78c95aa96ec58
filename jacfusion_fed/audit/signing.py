"""Checkpoint signatures with the service's own TLS key (``cryptography``).

A checkpoint entry names its signer (certificate CN and SHA-256 fingerprint) and carries
``sig``: the signature, base64, over the canonical JSON of the checkpoint without ``sig`` and
``hash`` (so it covers ``head``, ``seq`` and ``prev``). ``jacfusion-fed certs`` makes EC P-256
keys (ECDSA with SHA-256); RSA keys are signed with PKCS#1 v1.5 / SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from .chain import canonical

__all__ = ["Signer", "certificate_fingerprint", "load_cert", "signed_bytes", "verify_signature"]

_ALG_EC = "ecdsa-sha256"
_ALG_RSA = "rsa-pkcs1v15-sha256"


def certificate_fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a certificate's DER bytes (as ``openssl x509 -fingerprint``)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def load_cert(path: Path) -> x509.Certificate:
    """A PEM certificate from a file, or ``cert.pem`` of a certificate directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "cert.pem"
    return x509.load_pem_x509_certificate(path.read_bytes())


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What a checkpoint's signature covers: the checkpoint without ``sig`` and ``hash``."""
    return canonical({k: v for k, v in checkpoint.items() if k not in ("sig", "hash")})


@dataclass(frozen=True)
class Signer:
    """A private key and its certificate (the service's TLS identity)."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def from_files(cls, cert: Path, key: Path) -> Signer:
        """Load ``cert.pem`` and ``key.pem`` (unencrypted PEM, as ``certs`` writes them)."""
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        if not isinstance(private, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ValueError(f"{key}: only EC and RSA keys can sign the audit log")
        certificate = load_cert(Path(cert))
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        mine = private.public_key().public_bytes(serialization.Encoding.DER, spki)
        if certificate.public_key().public_bytes(serialization.Encoding.DER, spki) != mine:
            raise ValueError(f"{key} is not the key of the certificate {cert}")
        return cls(private, certificate)

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.cert.public_bytes(serialization.Encoding.DER))

    @property
    def algorithm(self) -> str:
        return _ALG_EC if isinstance(self.key, ec.EllipticCurvePrivateKey) else _ALG_RSA

    def describe(self) -> dict[str, str]:
        """The ``signer`` field of a checkpoint."""
        return {"cn": common_name(self.cert), "fingerprint": self.fingerprint}

    def sign(self, data: bytes) -> str:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            raw = self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        else:
            raw = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(raw).decode("ascii")


def verify_signature(cert: x509.Certificate, checkpoint: Mapping[str, Any]) -> str | None:
    """``None`` if ``checkpoint`` is signed by ``cert``'s key, else what is wrong."""
    signer = checkpoint.get("signer")
    sig = checkpoint.get("sig")
    if not isinstance(signer, dict) or not isinstance(sig, str):
        return "the checkpoint is not signed"
    expected = certificate_fingerprint(cert.public_bytes(serialization.Encoding.DER))
    if signer.get("fingerprint") != expected:
        return (
            f"signed by the certificate {signer.get('fingerprint')}, not by the given one "
            f"({expected})"
        )
    try:
        raw = base64.b64decode(sig, validate=True)
    except ValueError:
        return "the signature is not base64"
    public = cert.public_key()
    data = signed_bytes(checkpoint)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(raw, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return "the certificate's key is neither EC nor RSA"
    except InvalidSignature:
        return "the signature does not match (the checkpoint or the chain before it was changed)"
    return None
