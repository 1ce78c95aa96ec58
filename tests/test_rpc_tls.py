"""Real gRPC servers on 127.0.0.1 with mutual TLS: who gets in, and with which status code."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
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
    owner_server_name,
    write_credentials,
)
from jacfusion_fed.rpc.auth import (
    FUSION_SERVICE_POLICY,
    MODALITY_SERVICE_POLICY,
    AuthError,
    AuthInterceptor,
    Principal,
    RpcPolicy,
    caller,
    check_own_certificate,
    connect_owner,
    fetch_server_principal,
    require_roles,
)
from jacfusion_fed.rpc.jacfusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    modality_pb2,
    modality_pb2_grpc,
)
from jacfusion_fed.rpc.matrix import decode_matrix, encode_matrix
from jacfusion_fed.rpc.tls import (
    INSECURE,
    TlsFiles,
    TransportOptions,
    create_channel,
    create_server,
)

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


def _issue_without_role(ca: CertificateAuthority) -> IssuedCertificate:
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


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("pki")
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
    write_credentials(extra / "no_role", _issue_without_role(ca), ca)
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


def _start_owner(tls: Any, modality: str = "ecg", **kwargs: Any) -> Running:
    servicer = FakeOwner(modality)
    kwargs.setdefault("interceptors", [AuthInterceptor(MODALITY_SERVICE_POLICY)])
    server, port = create_server(tls, max_workers=4, **kwargs)
    modality_pb2_grpc.add_ModalityServiceServicer_to_server(servicer, server)
    server.start()
    return Running(f"127.0.0.1:{port}", servicer, server)


@pytest.fixture(scope="module")
def owner(dep: Deployment) -> Iterator[Running]:
    running = _start_owner(dep.owners["ecg"])
    yield running
    running.server.stop(0)


@pytest.fixture(scope="module")
def fusion(dep: Deployment) -> Iterator[Running]:
    servicer = FakeFusion()
    server, port = create_server(
        dep.coordinator, interceptors=[AuthInterceptor(FUSION_SERVICE_POLICY)], max_workers=4
    )
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server)
    server.start()
    yield Running(f"127.0.0.1:{port}", servicer, server)
    server.stop(0)


def _owner_stub(target: str, tls: Any, **kwargs: Any) -> Any:
    return modality_pb2_grpc.ModalityServiceStub(create_channel(target, tls, **kwargs))


def _info(stub: Any) -> Any:
    return stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=TIMEOUT)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()


# -- accepted ---------------------------------------------------------------------------------


def test_coordinator_reaches_owner(dep: Deployment, owner: Running) -> None:
    stub = _owner_stub(owner.target, dep.coordinator, server_name=owner_server_name("ecg"))
    assert _info(stub).modality == "ecg"
    assert owner.servicer.calls[-1] == Principal("coordinator", "coordinator")

    head = stub.GetHead(modality_pb2.GetHeadRequest(), timeout=TIMEOUT)
    assert head.WhichOneof("head") == "gram"
    np.testing.assert_array_equal(decode_matrix(head.gram.gram, shape=(4, 4)), np.eye(4))
    code, _ = _code(
        lambda: stub.GetHead(
            modality_pb2.GetHeadRequest(kind=modality_pb2.HEAD_KIND_FULL), timeout=TIMEOUT
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED

    resp = stub.GetLogits(
        modality_pb2.GetLogitsRequest(sample_ids=["id2", "nope", "id0"]), timeout=TIMEOUT
    )
    assert list(resp.batch.sample_ids) == ["id2", "id0"]
    assert list(resp.batch.unknown_sample_ids) == ["nope"]
    np.testing.assert_array_equal(
        decode_matrix(resp.batch.logits), np.stack([np.arange(4.0) + 2, np.arange(4.0)])
    )
    chunks = list(
        stub.StreamLogits(
            modality_pb2.StreamLogitsRequest(sample_ids=["id0", "id1", "id2"], chunk_size=2),
            timeout=TIMEOUT,
        )
    )
    assert [list(c.batch.sample_ids) for c in chunks] == [["id0", "id1"], ["id2"]]

    code, _ = _code(
        lambda: stub.GetLogits(
            modality_pb2.GetLogitsRequest(sample_ids=["id0"], expected_model_version="ffff"),
            timeout=TIMEOUT,
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_connect_owner_pins_the_modality(dep: Deployment, owner: Running) -> None:
    assert fetch_server_principal(owner.target, dep.coordinator) == Principal(
        "owner", "cardiology", "ecg"
    )
    channel = connect_owner(owner.target, dep.coordinator, "ecg")
    assert _info(modality_pb2_grpc.ModalityServiceStub(channel)).modality == "ecg"
    with pytest.raises(AuthError) as info:
        connect_owner(owner.target, dep.coordinator, "x_ray")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "expected the owner of modality 'x_ray'" in info.value.details
    assert "owner 'cardiology' (modality 'ecg')" in info.value.details
    # Without the early check, gRPC's own handshake still refuses the wrong server.
    channel = connect_owner(owner.target, dep.coordinator, "x_ray", verify_now=False)
    code, _ = _code(lambda: _info(modality_pb2_grpc.ModalityServiceStub(channel)))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_requester_predicts(dep: Deployment, fusion: Running) -> None:
    stub = fusion_pb2_grpc.FusionServiceStub(create_channel(fusion.target, dep.requester))
    resp = stub.Predict(fusion_pb2.PredictRequest(sample_ids=["a", "b"]), timeout=TIMEOUT)
    assert list(resp.predictions.sample_ids) == ["a", "b"]
    chunks = list(
        stub.PredictStream(fusion_pb2.PredictStreamRequest(sample_ids=["a", "b"]), timeout=5)
    )
    assert len(chunks) == 2
    info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.num_classes == 2


# -- refused at the TLS handshake -------------------------------------------------------------


@pytest.mark.parametrize("which", ["no_client_cert", "foreign_coordinator", "expired_coordinator"])
def test_handshake_refuses_bad_client_certs(dep: Deployment, owner: Running, which: str) -> None:
    before = len(owner.servicer.calls)
    tls = getattr(dep, which)
    stub = _owner_stub(owner.target, tls, client_certificate=(which != "no_client_cert"))
    code, _ = _code(lambda: _info(stub))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert len(owner.servicer.calls) == before, "the servicer must never run"


def test_client_refuses_expired_server_cert(dep: Deployment) -> None:
    running = _start_owner(dep.expired_owner)
    try:
        code, _ = _code(lambda: _info(_owner_stub(running.target, dep.coordinator)))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert running.servicer.calls == []
        with pytest.raises(ssl.SSLError):
            fetch_server_principal(running.target, dep.coordinator)
    finally:
        running.server.stop(0)


# -- authenticated but not allowed: PERMISSION_DENIED ------------------------------------------


def test_requester_may_not_call_owner(dep: Deployment, owner: Running) -> None:
    code, details = _code(lambda: _info(_owner_stub(owner.target, dep.requester)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "requester 'alice'" in details
    assert "/jacfusion.v1.ModalityService/GetInfo" in details
    assert "allowed roles: coordinator" in details


def test_owner_may_not_call_another_owner(dep: Deployment, owner: Running) -> None:
    stub = _owner_stub(owner.target, dep.owners["x_ray"])
    code, details = _code(
        lambda: list(
            stub.StreamLogits(modality_pb2.StreamLogitsRequest(sample_ids=["id0"]), timeout=5)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "owner 'radiology' (modality 'x_ray')" in details


@pytest.mark.parametrize("who", ["coordinator", "owner"])
def test_only_requesters_predict(dep: Deployment, fusion: Running, who: str) -> None:
    tls = dep.coordinator if who == "coordinator" else dep.owners["ecg"]
    stub = fusion_pb2_grpc.FusionServiceStub(create_channel(fusion.target, tls))
    before = fusion.servicer.calls
    code, details = _code(
        lambda: stub.Predict(fusion_pb2.PredictRequest(sample_ids=["a"]), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "/jacfusion.v1.FusionService/Predict" in details and "requester" in details
    code, _ = _code(
        lambda: list(
            stub.PredictStream(fusion_pb2.PredictStreamRequest(sample_ids=["a"]), timeout=5)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert fusion.servicer.calls == before


def test_owner_may_not_read_model_info(dep: Deployment, fusion: Running) -> None:
    stub = fusion_pb2_grpc.FusionServiceStub(create_channel(fusion.target, dep.owners["ecg"]))
    code, _ = _code(lambda: stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_policy_fails_closed(dep: Deployment) -> None:
    policy = RpcPolicy.of({"/jacfusion.v1.FusionService/Predict": {"requester"}})
    server, port = create_server(dep.coordinator, interceptors=[AuthInterceptor(policy)])
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(FakeFusion(), server)
    server.start()
    try:
        stub = fusion_pb2_grpc.FusionServiceStub(create_channel(f"127.0.0.1:{port}", dep.requester))
        code, details = _code(
            lambda: stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "not open to any caller" in details
    finally:
        server.stop(0)


# -- no usable identity: UNAUTHENTICATED -------------------------------------------------------


def test_tls_without_client_auth_is_unauthenticated(dep: Deployment) -> None:
    running = _start_owner(dep.owners["ecg"], require_client_auth=False)
    try:
        stub = _owner_stub(running.target, dep.coordinator, client_certificate=False)
        code, details = _code(lambda: _info(stub))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "no client certificate presented" in details
        assert "/jacfusion.v1.ModalityService/GetInfo" in details
    finally:
        running.server.stop(0)


def test_certificate_without_role_is_unauthenticated(dep: Deployment, owner: Running) -> None:
    code, details = _code(lambda: _info(_owner_stub(owner.target, dep.no_role)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "CN='mallory'" in details and "jacfusion:// SAN URI" in details


def test_reverification_against_another_ca(dep: Deployment) -> None:
    other = CertificateAuthority.create("other CA")
    interceptor = AuthInterceptor(MODALITY_SERVICE_POLICY, ca_certificate=other.certificate)
    running = _start_owner(dep.owners["ecg"], interceptors=[interceptor])
    try:
        code, details = _code(lambda: _info(_owner_stub(running.target, dep.coordinator)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "failed verification" in details
    finally:
        running.server.stop(0)
    interceptor = AuthInterceptor(MODALITY_SERVICE_POLICY, ca_certificate=dep.ca.cert_pem)
    running = _start_owner(dep.owners["ecg"], interceptors=[interceptor])
    try:
        assert _info(_owner_stub(running.target, dep.coordinator)).modality == "ecg"
    finally:
        running.server.stop(0)


def test_insecure_mode_is_explicit(dep: Deployment) -> None:
    running = _start_owner(INSECURE)
    try:
        stub = _owner_stub(running.target, INSECURE)
        code, details = _code(lambda: _info(stub))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "not TLS-protected" in details
    finally:
        running.server.stop(0)
    dev = AuthInterceptor(
        MODALITY_SERVICE_POLICY, insecure_principal=Principal("coordinator", "dev")
    )
    running = _start_owner(INSECURE, interceptors=[dev])
    try:
        assert _info(_owner_stub(running.target, INSECURE)).modality == "ecg"
        assert running.servicer.calls == [Principal("coordinator", "dev")]
    finally:
        running.server.stop(0)


# -- decorator, binding and helpers ------------------------------------------------------------


class DecoratedOwner(FakeOwner):
    @require_roles("coordinator")
    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return super().GetInfo(request, context)


def test_require_roles_decorator(dep: Deployment) -> None:
    server, port = create_server(dep.owners["ecg"])
    modality_pb2_grpc.add_ModalityServiceServicer_to_server(DecoratedOwner("ecg"), server)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        assert _info(_owner_stub(target, dep.coordinator)).modality == "ecg"
        code, details = _code(lambda: _info(_owner_stub(target, dep.requester)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "GetInfo" in details
    finally:
        server.stop(0)


def test_binding_rules(dep: Deployment) -> None:
    with pytest.raises(ValueError, match="wildcard"):
        create_server(dep.coordinator, host="0.0.0.0")
    with pytest.raises(ValueError, match="wildcard"):
        create_server(dep.coordinator, host="::")
    with pytest.raises(ValueError, match="loopback"):
        create_server(INSECURE, host="10.1.2.3")
    with pytest.raises(ValueError, match="server_name requires TLS"):
        create_channel("127.0.0.1:1", INSECURE, server_name="x")
    server, port = create_server(dep.coordinator)
    assert port > 0
    with pytest.raises(OSError, match="could not bind"):
        create_server(dep.coordinator, port=port)  # SO_REUSEPORT is off
    server.stop(0)


def test_transport_options_validation() -> None:
    with pytest.raises(ValueError, match="max_receive_message_bytes"):
        TransportOptions(max_receive_message_bytes=0)
    with pytest.raises(ValueError, match="too_many_pings"):
        TransportOptions(keepalive_time_ms=1000, server_min_ping_interval_ms=5000)


def test_message_size_limit(dep: Deployment) -> None:
    running = _start_owner(
        dep.owners["ecg"], options=TransportOptions(max_receive_message_bytes=1024)
    )
    try:
        stub = _owner_stub(running.target, dep.coordinator)
        big = modality_pb2.GetLogitsRequest(sample_ids=["x" * 64] * 100)
        code, _ = _code(lambda: stub.GetLogits(big, timeout=TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.server.stop(0)


def test_check_own_certificate(dep: Deployment) -> None:
    assert check_own_certificate(dep.owners["ecg"], "owner", "ecg").name == "cardiology"
    with pytest.raises(ValueError, match="expected owner for modality 'x_ray'"):
        check_own_certificate(dep.owners["ecg"], "owner", "x_ray")
    with pytest.raises(ValueError, match="expected coordinator"):
        check_own_certificate(dep.requester, "coordinator")


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ca\.pem"):
        create_server(TlsFiles.from_dir(tmp_path))
