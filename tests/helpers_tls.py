"""Shared by the mutual-TLS tests (``test_rpc_auth.py``, ``test_rpc_tls.py``): a deployment's
certificates (good, expired, foreign, role-less), fake servicers and real gRPC servers on
127.0.0.1. Each test module builds its own module-scoped fixtures from :func:`make_deployment`,
:func:`serving_owner` and :func:`serving_fusion`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jacfusion_fed.privacy.certs import (
    CertificateAuthority,
    IssuedCertificate,
    generate_deployment_certs,
    write_credentials,
)
from jacfusion_fed.rpc.auth import AuthInterceptor
from jacfusion_fed.rpc.identity import Principal, caller
from jacfusion_fed.rpc.jacfusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    modality_pb2,
    modality_pb2_grpc,
)
from jacfusion_fed.rpc.matrix import encode_matrix
from jacfusion_fed.rpc.policies import FUSION_SERVICE_POLICY, MODALITY_SERVICE_POLICY
from jacfusion_fed.rpc.tls import TlsFiles, create_channel, create_server

TIMEOUT = 5.0
OWNERS = {"cardiology": "ecg", "radiology": "x_ray"}


@dataclass
class Deployment:
    root: Path
    ca: CertificateAuthority
    coordinator: TlsFiles
    owners: dict[str, TlsFiles]
    requester: TlsFiles
    expired_coordinator: TlsFiles
    foreign_coordinator: TlsFiles
    expired_owner: TlsFiles
    no_role: TlsFiles
    no_client_cert: TlsFiles


def issue_without_role(ca: CertificateAuthority) -> IssuedCertificate:
    """A valid certificate from the deployment CA that names no jacfusion role."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCertificate(cert, key)


def make_deployment(root: Path) -> Deployment:
    """Certificates of a deployment under ``root``, with the bad ones the tests need."""
    ca = CertificateAuthority.create()
    certs = generate_deployment_certs(root / "deploy", OWNERS, ["alice"], ca=ca)
    extra = root / "extra"
    write_credentials(extra / "expired", ca.issue("coordinator", "old", expired=True), ca)
    other = CertificateAuthority.create("other CA")
    # Foreign identity: signed by another CA, but trusting ours.
    write_credentials(extra / "foreign", other.issue("coordinator", "coordinator"), ca)
    write_credentials(
        extra / "expired_owner", ca.issue("owner", "cardiology", modality="ecg", expired=True), ca
    )
    write_credentials(extra / "no_role", issue_without_role(ca), ca)
    return Deployment(
        root=root,
        ca=ca,
        coordinator=TlsFiles.from_dir(certs.coordinator_dir),
        owners={m: TlsFiles.from_dir(certs.owner_dirs[n]) for n, m in OWNERS.items()},
        requester=TlsFiles.from_dir(certs.requester_dirs["alice"]),
        expired_coordinator=TlsFiles.from_dir(extra / "expired"),
        foreign_coordinator=TlsFiles.from_dir(extra / "foreign"),
        expired_owner=TlsFiles.from_dir(extra / "expired_owner"),
        no_role=TlsFiles.from_dir(extra / "no_role"),
        no_client_cert=TlsFiles.from_dir(certs.coordinator_dir),
    )


class FakeOwner(modality_pb2_grpc.ModalityServiceServicer):
    """Minimal ModalityService: 3 samples, K = 4, records who called."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.calls: list[Principal] = []
        self.logits = {f"id{i}": np.arange(4.0) + i for i in range(3)}

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(caller(context))
        return modality_pb2.GetInfoResponse(
            modality=self.modality,
            owner="cardiology",
            model_version="0123456789abcdef",
            num_classes=4,
            feature_dim=8,
            class_counts=[5, 5, 5, 5],
            shareable_head_kinds=[modality_pb2.HEAD_KIND_GRAM],
        )

    def GetHead(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(caller(context))
        if request.kind == modality_pb2.HEAD_KIND_FULL:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this owner shares only the Gram")
        return modality_pb2.GetHeadResponse(
            model_version="0123456789abcdef",
            num_classes=4,
            gram=modality_pb2.GramHead(gram=encode_matrix(np.eye(4))),
        )

    def _batch(self, ids: list[str]) -> Any:
        known = [i for i in ids if i in self.logits]
        rows = np.stack([self.logits[i] for i in known]) if known else np.zeros((0, 4))
        return modality_pb2.LogitsBatch(
            sample_ids=known,
            logits=encode_matrix(rows),
            unknown_sample_ids=[i for i in ids if i not in self.logits],
        )

    def GetLogits(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(caller(context))
        if request.expected_model_version not in ("", "0123456789abcdef"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model version changed")
        return modality_pb2.GetLogitsResponse(
            model_version="0123456789abcdef", batch=self._batch(list(request.sample_ids))
        )

    def StreamLogits(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.calls.append(caller(context))
        ids = list(request.sample_ids)
        size = request.chunk_size or 2
        for start in range(0, len(ids), size):
            yield modality_pb2.StreamLogitsResponse(
                model_version="0123456789abcdef", batch=self._batch(ids[start : start + size])
            )

    # Live records are not part of these tests (the generated base answers UNIMPLEMENTED too).
    def PutRecords(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "PutRecords: not in this fake")

    def DeleteRecords(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeleteRecords: not in this fake")


class FakeFusion(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        n = len(request.sample_ids)
        return fusion_pb2.PredictResponse(
            predictions=fusion_pb2.Predictions(
                sample_ids=request.sample_ids,
                probabilities=encode_matrix(np.full((n, 2), 0.5)),
                predicted_labels=[0] * n,
            )
        )

    def PredictStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.calls += 1
        for sid in request.sample_ids:
            yield fusion_pb2.PredictStreamResponse(
                predictions=fusion_pb2.Predictions(sample_ids=[sid])
            )

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        return fusion_pb2.GetModelInfoResponse(num_classes=2, class_prior=[0.5, 0.5])


@dataclass
class Running:
    target: str
    servicer: Any
    server: grpc.Server


def start_owner(tls: Any, modality: str = "ecg", **kwargs: Any) -> Running:
    servicer = FakeOwner(modality)
    kwargs.setdefault("interceptors", [AuthInterceptor(MODALITY_SERVICE_POLICY)])
    server, port = create_server(tls, max_workers=4, **kwargs)
    modality_pb2_grpc.add_ModalityServiceServicer_to_server(servicer, server)
    server.start()
    return Running(f"127.0.0.1:{port}", servicer, server)


@contextmanager
def serving_owner(tls: Any, modality: str = "ecg", **kwargs: Any) -> Iterator[Running]:
    """:func:`start_owner`, stopped on exit."""
    running = start_owner(tls, modality, **kwargs)
    try:
        yield running
    finally:
        running.server.stop(0)


@contextmanager
def serving_fusion(tls: Any) -> Iterator[Running]:
    """A :class:`FakeFusion` behind the FusionService policy, stopped on exit."""
    servicer = FakeFusion()
    server, port = create_server(
        tls, interceptors=[AuthInterceptor(FUSION_SERVICE_POLICY)], max_workers=4
    )
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server)
    server.start()
    try:
        yield Running(f"127.0.0.1:{port}", servicer, server)
    finally:
        server.stop(0)


def owner_stub(target: str, tls: Any, **kwargs: Any) -> Any:
    return modality_pb2_grpc.ModalityServiceStub(create_channel(target, tls, **kwargs))


def get_info(stub: Any) -> Any:
    return stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=TIMEOUT)


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()
