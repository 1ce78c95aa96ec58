"""Privacy primitives: deployment certificates and keys, HMAC pseudonyms."""

from jacfusion_fed.privacy._fileio import check_private_file
from jacfusion_fed.privacy.certs import (
    CertificateAuthority,
    DeploymentCerts,
    IssuedCertificate,
    certificate_identity,
    generate_deployment_certs,
    generate_supernode_auth_keys,
    owner_server_name,
)
from jacfusion_fed.privacy.pseudonyms import (
    Pseudonymizer,
    generate_key,
    load_key,
    pseudonymize,
    write_key,
)

__all__ = [
    "CertificateAuthority",
    "DeploymentCerts",
    "IssuedCertificate",
    "Pseudonymizer",
    "certificate_identity",
    "check_private_file",
    "generate_deployment_certs",
    "generate_key",
    "generate_supernode_auth_keys",
    "load_key",
    "owner_server_name",
    "pseudonymize",
    "write_key",
]
