"""Status codes as fusion.proto documents them, and client-side diagnosis of TLS failures.

In-process servers: the two owners of a trained deployment, a coordinator told the owners'
addresses swapped, and a plaintext server; foreign certificates from a second CA.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from helpers_services import MODALITIES, Fed, build_fed, foreign_certs, rpc_error

from jacfusion_fed.clients.serve import OwnerServer, serve_owner
from jacfusion_fed.privacy.certs import CertificateAuthority, write_credentials
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.diagnose import diagnose_tls_failure
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
from jacfusion_fed.rpc.tls import INSECURE, TlsFiles
from jacfusion_fed.server.coordinator import Coordinator, OwnerEndpoint
from jacfusion_fed.server.serve import CoordinatorServer, serve_coordinator


@dataclass
class Setup:
    fed: Fed
    owners: dict[str, OwnerServer]
    swapped: CoordinatorServer
    plaintext: OwnerServer
    foreign: TlsFiles


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("diagnose")
    fed = build_fed(root)
    owners = {m: serve_owner(fed.workspaces[m], fed.owner_tls(m)) for m in MODALITIES}
    swapped = Coordinator(
        root / "registry",
        [
            OwnerEndpoint("audio", owners["image"].target),
            OwnerEndpoint("image", owners["audio"].target),
        ],
        fed.coordinator_tls,
    )
    server = serve_coordinator(swapped, fed.coordinator_tls, sync=False)
    plaintext = serve_owner(fed.workspaces["audio"], INSECURE)
    foreign = TlsFiles.from_dir(foreign_certs(root / "foreign").requester_dirs["mallory"])
    try:
        yield Setup(fed, owners, server, plaintext, foreign)
    finally:
        for s in (*owners.values(), plaintext):
            s.stop(None)
        server.stop(None)


def test_every_owner_of_another_modality_is_permission_denied(setup: Setup) -> None:
    """fusion.proto: PERMISSION_DENIED when every selected owner holds another modality's
    certificate, with the reason in the status message (it was UNAVAILABLE, reason only in
    the coordinator's log)."""
    errors = setup.swapped.coordinator.sync()  # what the background sync does
    assert all(e.startswith("PERMISSION_DENIED") for e in errors.values()), errors
    stub = fusion_pb2_grpc.FusionServiceStub(
        connect_coordinator(setup.swapped.target, setup.fed.requester)
    )
    request = fusion_pb2.PredictRequest(sample_ids=setup.fed.ids[:2])
    code, details = rpc_error(lambda: stub.Predict(request, timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "owner 'image-co' (modality 'image'), expected the owner of modality 'audio'" in (
        details
    )
    assert "owner 'audio-co' (modality 'audio'), expected the owner of modality 'image'" in (
        details
    )


def test_no_client_certificate(setup: Setup, tmp_path: Path) -> None:
    """A certificate directory with the CA only (TlsFiles refuses missing files at
    construction, so the diagnosis takes the directory itself)."""
    (tmp_path / "ca.pem").write_bytes(setup.fed.requester.ca_cert.read_bytes())
    line = diagnose_tls_failure(setup.swapped.target, tmp_path, "UNAVAILABLE: failed to connect")
    assert line.startswith("no client certificate") and str(tmp_path / "cert.pem") in line


def test_certificate_of_another_role(setup: Setup) -> None:
    """An owner's files where the call needs a requester's."""
    line = diagnose_tls_failure(
        setup.swapped.target, setup.fed.owner_tls("audio"), own_role="requester"
    )
    assert "belongs to the owner 'audio-co'" in line and "needs a requester certificate" in line


def test_key_of_another_certificate(setup: Setup, tmp_path: Path) -> None:
    ours = setup.fed.requester
    mixed = TlsFiles(ours.ca_cert, ours.cert, setup.fed.owner_tls("audio").key)
    line = diagnose_tls_failure(setup.swapped.target, mixed)
    assert f"the private key {mixed.key} does not belong to {ours.cert}" in line


def test_foreign_ca(setup: Setup) -> None:
    line = diagnose_tls_failure(setup.swapped.target, setup.foreign)
    assert "another deployment" in line or "another CA" in line, line
    assert "\n" not in line


def test_certificate_of_another_ca_with_our_ca_file(setup: Setup, tmp_path: Path) -> None:
    other = CertificateAuthority.create("someone else's CA")
    write_credentials(tmp_path / "eve", other.issue("requester", "eve"), other)
    ours = setup.fed.requester
    eve = TlsFiles(ours.ca_cert, tmp_path / "eve" / "cert.pem", tmp_path / "eve" / "key.pem")
    line = diagnose_tls_failure(setup.swapped.target, eve)
    assert "not issued by the CA" in line and "someone else's CA" in line


def test_plaintext_against_tls_and_tls_against_plaintext(setup: Setup) -> None:
    line = diagnose_tls_failure(setup.swapped.target, None, "Socket closed")
    assert "speaks TLS" in line and "--insecure" in line and "--tls DIR" in line
    line = diagnose_tls_failure(setup.plaintext.target, setup.fed.requester)
    assert "serves plain text" in line


def test_wrong_owner_name_and_wrong_address(setup: Setup) -> None:
    line = diagnose_tls_failure(
        setup.owners["image"].target,
        setup.fed.coordinator_tls,
        expected_role="owner",
        modality="audio",
    )
    assert "is the owner 'image-co' (modality 'image'), not the owner of modality 'audio'" in line
    line = diagnose_tls_failure(setup.owners["image"].target, setup.fed.requester)
    assert "not the coordinator" in line
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "nothing is listening" in diagnose_tls_failure(f"127.0.0.1:{port}", setup.fed.requester)


def test_right_files_name_no_culprit(setup: Setup) -> None:
    line = diagnose_tls_failure(
        setup.owners["audio"].target,
        setup.fed.coordinator_tls,
        "DEADLINE_EXCEEDED",
        expected_role="owner",
        modality="audio",
    )
    assert "certificates check out" in line and "DEADLINE_EXCEEDED" in line
